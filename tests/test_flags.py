"""Every numeric flag is checked for being finite and in range by argparse, and the error names the flag."""
import pytest

import app
import convert_checkpoint
import demo
import evaluate
import parse_coco
import predict
import shapes_data
import train

PARSERS = {
    "predict": lambda argv: predict.parse_args(["--checkpoint", "x", "--image", "a.jpg", *argv]),
    "evaluate": lambda argv: evaluate.build_parser().parse_args(["--checkpoint", "x", "--annotations", "a", *argv]),
    "parse_coco": lambda argv: parse_coco.build_parser().parse_args(argv),
    "train": lambda argv: train.build_parser().parse_args(argv),
    "demo": lambda argv: demo.build_parser().parse_args(argv),
    "shapes_data": lambda argv: shapes_data.build_parser().parse_args(argv),
    "convert_checkpoint": lambda argv: convert_checkpoint.build_parser().parse_args(["--checkpoint", "c", "--out_dir",
                                                                                    "o", *argv]),
    "app": lambda argv: app.build_parser().parse_args(argv),
}

BAD = [
    ("predict", "--temperature", ["nan", "inf", "1e-45", "0", "-1"], "a finite number in [0.01, 100]"),
    ("predict", "--top_p", ["0", "1.5", "nan"], "a finite number in (0, 1]"),
    ("predict", "--seed", ["-5", "1.5"], "an integer in [0, 4294967295]"),
    ("predict", "--beam_size", ["0", "x"], "an integer at least 1"),
    ("predict", "--max_length", ["0"], "an integer at least 1"),
    ("predict", "--num_captions", ["0"], "an integer at least 1"),
    ("predict", "--batch_size", ["-1"], "an integer at least 1"),
    ("predict", "--threads", ["0"], "an integer at least 1"),
    ("evaluate", "--max_images", ["0"], "an integer at least 1"),
    ("evaluate", "--beam_size", ["0"], "an integer at least 1"),
    ("parse_coco", "--image_size", ["0", "-3"], "an integer at least 1"),
    ("parse_coco", "--max_image_pixels", ["-1", "0"], "an integer at least 1"),
    ("parse_coco", "--num_workers", ["-1"], "an integer at least 0"),
    ("parse_coco", "--batch_size", ["0"], "an integer at least 1"),
    ("train", "--lr", ["nan", "-1e-3", "inf"], "a finite number in [0, inf)"),
    ("train", "--adam_eps", ["0", "nan"], "a finite number in (0, inf)"),
    ("train", "--val_fraction", ["0", "1", "nan"], "a finite number in (0, 1)"),
    ("train", "--bs", ["0"], "an integer at least 1"),
    ("train", "--grad_accum", ["0"], "an integer at least 1"),
    ("train", "--warmup_steps", ["-1"], "an integer at least 0"),
    ("train", "--image_size", ["0"], "an integer at least 1"),
    ("train", "--seed", ["-5"], "an integer in [0, 4294967295]"),
    ("train", "--grad_clip", ["nan"], "a finite number in [0, inf)"),
    ("demo", "--steps", ["0"], "an integer at least 1"),
    ("demo", "--image_size", ["8"], "an integer at least 16"),
    ("demo", "--encoder_lr", ["0", "nan"], "a finite number in (0, inf)"),
    ("shapes_data", "--num_train", ["0"], "an integer at least 1"),
    ("convert_checkpoint", "--prefix_length", ["0"], "an integer at least 1"),
]


@pytest.mark.parametrize("script, flag, values, expected", BAD, ids=[f"{s}{f}" for s, f, _, _ in BAD])
def test_bad_numbers_are_refused_naming_the_flag(capsys, script, flag, values, expected):
    for value in values:
        with pytest.raises(SystemExit) as e:
            PARSERS[script]([f"{flag}={value}"])
        assert e.value.code == 2
        assert f"error: argument {flag}: expected {expected}, got '{value}'" in capsys.readouterr().err


def test_good_numbers_pass_through():
    args = PARSERS["predict"](["--temperature", "0.5", "--top_p", "1", "--seed", "0", "--beam_size", "3"])
    assert (args.temperature, args.top_p, args.seed, args.beam_size) == (0.5, 1.0, 0, 3)
    args = PARSERS["train"](["--lr", "0", "--val_fraction", "0.2", "--warmup_steps", "0"])
    assert (args.lr, args.val_fraction, args.warmup_steps) == (0.0, 0.2, 0)


@pytest.mark.parametrize("script", ["train", "convert_checkpoint"])
def test_a_decoder_path_that_is_not_a_directory_is_refused(tmp_path, capsys, script):
    (tmp_path / "file").write_text("x")
    flag = "--gpt2/--decoder" if script == "train" else "--gpt2"  # train.py takes any causal LM under both names
    for value, problem in ((str(tmp_path / "missing"), "no such directory"), (str(tmp_path / "file"),
                                                                             "is a file, not a directory")):
        with pytest.raises(SystemExit):
            PARSERS[script](["--gpt2", value])
        assert f"error: argument {flag}: {value}: {problem}; give a directory written by save_pretrained" in \
            capsys.readouterr().err
    with pytest.raises(SystemExit):
        PARSERS[script](["--gpt2", str(tmp_path)])
    assert f"error: argument {flag}: {tmp_path}: holds no config.json" in capsys.readouterr().err
    (tmp_path / "config.json").write_text("{}")
    assert PARSERS[script](["--gpt2", "distilgpt2"]).gpt2 == "distilgpt2"
    assert PARSERS[script](["--gpt2", str(tmp_path)]).gpt2 == str(tmp_path)
    if script == "train":
        assert PARSERS[script](["--decoder", str(tmp_path)]).gpt2 == str(tmp_path)


def test_unknown_encoders_and_arguments_are_clear_errors():
    from models.encoder import EncoderConfig, ImageEncoder

    with pytest.raises(ValueError, match=r"encoder 'tiny_vit_21m': timm has no model of that name; the closest it "
                                         r"knows: .*tiny_vit_21m_224"):
        ImageEncoder(EncoderConfig(name="tiny_vit_21m", weights="random"))
    with pytest.raises(ValueError, match=r"encoder 'test_resnet': timm cannot build it with these arguments "
                                         r"\(--encoder_kwargs\): .*unexpected keyword argument 'colour'"):
        ImageEncoder(EncoderConfig(name="test_resnet", weights="random", model_kwargs={"colour": 1}))


def test_an_empty_image_array_is_an_error_result(tokenizer):
    import numpy as np

    from builders import tiny_captioner
    from models.encoder import EncoderConfig, ImageEncoder
    from predict import Captioner

    encoder = ImageEncoder(EncoderConfig(name="test_resnet", weights="random", image_size=32)).eval()
    captioner = Captioner(tiny_captioner(tokenizer, encoder), tokenizer)
    results = captioner.predict([np.zeros((0, 0, 3), dtype=np.uint8)], on_error="keep")
    assert results[0].error == "<array 0>: an image of 0x0 pixels; nothing to caption"


HELP_CHECK = """
import runpy, sys
heavy = ("torch", "timm", "transformers", "numpy", "PIL")
for script, argv in {cases!r}:
    sys.argv = [script, *argv]
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as e:
        print("CHECK", script, e.code, [m for m in heavy if m in sys.modules])
"""


def test_help_and_flag_errors_come_before_the_heavy_imports():
    """`--help` and a bad flag answer without importing torch, timm, transformers, numpy or PIL (seconds)."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    cases = [(f"{name}.py", ["--help"]) for name in PARSERS] + [("predict.py", ["--checkpoint", "x", "--image", "a",
                                                                              "--temperature", "nan"]),
                                                             ("train.py", ["--bs", "0"])]
    out = subprocess.run([sys.executable, "-c", HELP_CHECK.format(cases=cases)], cwd=root, capture_output=True,
                         text=True, timeout=120)
    lines = [line for line in out.stdout.splitlines() if line.startswith("CHECK ")]
    assert lines == [f"CHECK {script} {0 if argv == ['--help'] else 2} []" for script, argv in cases], \
        out.stderr[-2000:]
