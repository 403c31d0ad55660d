"""CIDEr optimisation (train.py --scst): self-critical sequence training as a second stage after cross-entropy.

Each step, for every image of the batch, `samples` captions are drawn from the model's own distribution (the
key/value-cached sampler of models/decoding.py, without gradients), each is scored by CIDEr-D against the
image's training references (captioning/cider.py), and the loss of one teacher-forced pass over the samples is

    -(reward - baseline) x log p(sampled tokens, end token included)      (padding masked, mean over samples)

with the mean reward of the image's other samples as the baseline (Luo 2020, arXiv 2003.09971) or the reward of
its greedy caption (Rennie et al. 2017, arXiv 1612.00563). Draws come from noise seeded by (seed, step, image),
so a step does not depend on which other images share its batch, and a resumed run draws what an uninterrupted
one would. Rewards are computed per process for its own images; only the logged means cross processes.
"""
from dataclasses import dataclass
from typing import Dict, List, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from captioning.cider import CiderD, bleu4
from captioning.runtime import FP32, Distributed, Precision
from captioning.training.config import SCST_BASELINES
from captioning.training.loop import CaptionLoss, MicroBatchLoss, Stepper
from models.decoding import greedy, sample, sampling_noise


@dataclass
class ScstOptions:
    samples: int = 5  # captions drawn per image
    top_p: float = 1.0  # 1: the model's whole distribution
    max_length: int = 20  # most tokens per sampled caption, end token included
    baseline: str = "mean"  # "mean": of the image's other samples; "greedy": its greedy caption's reward
    bleu_weight: float = 0.0  # reward = CIDEr-D + bleu_weight x BLEU-4
    seed: int = 0

    def __post_init__(self):
        if self.baseline not in SCST_BASELINES:
            raise ValueError(f"baseline must be one of {SCST_BASELINES}, got {self.baseline!r}")
        if self.baseline == "mean" and self.samples < 2:
            raise ValueError("the mean baseline compares each sample with the image's others: draw 2 samples or "
                             "more, or use the greedy baseline")


class ScstImages(Dataset):
    """The distinct images of a caption dataset (FeatureCaptionDataset or ImageCaptionDataset), each with all
    of its captions in that dataset as references: SCST's batches count images, not captions."""

    def __init__(self, captions):
        self.base = captions
        rows: Dict[int, List[str]] = {}
        for c in captions.caption_ids:
            rows.setdefault(int(captions.image_index[c]), []).append(captions.captions[c])
        self.rows = sorted(rows)
        self.references = rows  # {image row: [caption, ...]}
        self.first_caption = {int(captions.image_index[c]): int(c) for c in captions.caption_ids[::-1]}

    def __len__(self) -> int:
        return len(self.rows)

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.base, "set_epoch"):
            self.base.set_epoch(epoch)

    def __getitem__(self, i: int):
        row = self.rows[i]
        if hasattr(self.base, "image"):  # images: cached, or loaded (and augmented) as for cross-entropy
            return row, self.base.image(row, self.first_caption[row])
        return row, self.base.features[row].float()


def collate_images(batch) -> Dict:
    rows, inputs = zip(*batch)
    return {"rows": torch.tensor(rows, dtype=torch.long), "inputs": torch.stack(inputs), "num_tokens": 0}


class Rewards:
    """CIDEr-D (plus `bleu_weight` x BLEU-4) of captions against an image's references; CIDEr-D's document
    frequencies come from all the references given, once."""

    def __init__(self, references: Dict[int, List[str]], bleu_weight: float = 0.0):
        self.references = references
        self.cider = CiderD(references)
        self.bleu_weight = bleu_weight

    def __call__(self, row: int, captions: Sequence[str]) -> np.ndarray:
        reward = self.cider.score(row, captions)
        if self.bleu_weight:
            reward = reward + self.bleu_weight * bleu4(self.references[row], captions)
        return reward


def baselines(rewards: np.ndarray) -> np.ndarray:
    """Each sample's baseline: the mean reward of the other samples of its image (rewards: (B, N), N >= 2)."""
    return rewards - advantages(rewards)


def advantages(rewards: np.ndarray) -> np.ndarray:
    """Each sample's reward less its baseline, computed on rewards less the image's first one: an image whose
    samples score the same gets exactly zero (and so no gradient), not a rounding error."""
    centred = rewards - rewards[:, :1]
    return centred - (centred.sum(axis=1, keepdims=True) - centred) / (rewards.shape[1] - 1)


class ScstLoss(nn.Module):
    """The self-critical loss of a batch of images as one forward pass, so DistributedDataParallel sees it.

    Returns the loss (mean over this process's samples) and device tensors of what the log reports."""

    def __init__(self, model: nn.Module, tokenizer, rewards: Rewards, options: ScstOptions, images: bool,
                 channels_last: bool = False):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.rewards = rewards
        self.options = options
        self.images = images
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def forward(self, inputs: torch.Tensor, rows: torch.Tensor, step: int):
        model, opts = self.model, self.options
        if self.images:
            features = model.features_from(images=inputs.contiguous(memory_format=self.memory_format))
        else:
            features = model.features_from(inputs)
        prefix = model.prefix_embeddings(features)  # (B, P, C), with gradients
        drawn, greedy_rewards = self.draw(prefix.detach(), rows.tolist(), step)
        n = opts.samples
        tokens, lengths = drawn.tokens.flatten(0, 1), drawn.lengths.flatten()  # (B * N, L), (B * N,)
        rewards = np.stack([self.rewards(row, texts) for row, texts in zip(rows.tolist(), self.texts(drawn))])
        if greedy_rewards is None:
            advantage = advantages(rewards)
            base = rewards - advantage
        else:
            base = np.repeat(greedy_rewards[:, None], n, axis=1)
            advantage = rewards - base
        advantage = torch.as_tensor(advantage, dtype=torch.float32, device=prefix.device).flatten()
        tokens = tokens[:, : int(lengths.max())]
        keep = torch.arange(tokens.shape[1], device=tokens.device)[None, :] < lengths[:, None]
        token_embeds = model.token_embeddings(tokens)
        embeds = torch.cat((prefix.repeat_interleave(n, dim=0).to(token_embeds.dtype), token_embeds), dim=1)
        logits = model.caption_logits(tokens, keep, embeds)
        token_logp = -F.cross_entropy(logits.float(), tokens[keep], reduction="none")
        weights = advantage[:, None].expand_as(keep)[keep]
        loss = -(weights * token_logp).sum() / len(lengths)
        ended = self.ended(drawn)
        stats = {"reward": float(rewards.mean()), "baseline": float(base.mean()), "ended": float(ended),
                 "tokens": float(lengths.sum())}
        return loss, stats

    @torch.no_grad()
    def draw(self, prefix: torch.Tensor, rows: List[int], step: int):
        """`samples` captions per image from the decoder in eval mode (the policy without dropout), and the
        greedy captions' rewards when they are the baseline."""
        model, opts = self.model, self.options
        decoder_mode = model.gpt.training
        model.gpt.eval()
        try:
            noise = sampling_noise((opts.seed, step), rows, opts.samples, opts.max_length)
            drawn = sample(model.gpt, prefix, model.config.eos_token_ids, opts.samples, opts.top_p, 1.0,
                           opts.max_length, noise)
            greedy_rewards = None
            if opts.baseline == "greedy":
                best = greedy(model.gpt, prefix, model.config.eos_token_ids, opts.max_length)
                greedy_rewards = np.array([self.rewards(row, texts)[0]
                                           for row, texts in zip(rows, self.texts(best))])
        finally:
            model.gpt.train(decoder_mode)
        return drawn, greedy_rewards

    def texts(self, decoded) -> List[List[str]]:
        """Captions per image, as the Captioner writes them."""
        return [[" ".join(t.split()) for t in self.tokenizer.batch_decode(seqs, skip_special_tokens=True)]
                for seqs in decoded.sequences()]

    def ended(self, decoded) -> float:
        """The share of samples that end with an end token (the others ran into max_length)."""
        eos = torch.tensor(self.model.config.eos_token_ids, device=decoded.tokens.device)
        last = decoded.tokens.gather(2, (decoded.lengths - 1).clamp(min=0)[..., None]).squeeze(-1)
        return torch.isin(last, eos).float().mean().item()


class ScstStepper(Stepper):
    """One optimizer step of CIDEr optimisation over `grad_accum` micro-batches of images.

    Returns this process's share of the step's loss, as Stepper does; `stats` holds the step's mean reward,
    baseline, share of ended samples and sampled tokens, for the log."""

    def __init__(self, loss_module: nn.Module, caption_loss: CaptionLoss, optimizer, scheduler, dist: Distributed,
                 precision: Precision = FP32, grad_clip: float = 0.0):
        super().__init__(loss_module, optimizer, scheduler, dist, precision, grad_clip)
        self._caption_loss = caption_loss
        self.stats: Dict[str, float] = {}

    @property
    def caption_loss(self) -> nn.Module:
        """Validation stays the cross-entropy of the validation captions."""
        return self._caption_loss

    def __call__(self, micro_batches: Sequence[Dict], step: int = 0) -> torch.Tensor:
        n = len(micro_batches)
        losses = self.backward(micro_batches, [1.0 / n] * n,
                               lambda batch: MicroBatchLoss(*self.loss_module(batch["inputs"], batch["rows"], step)))
        # this process's part of the mean over all processes' samples, as Stepper returns it
        share = sum(loss.float() / (n * self.dist.world_size) for loss, _ in losses)
        totals: Dict[str, float] = {}
        for _, stats in losses:
            for k, v in stats.items():
                totals[k] = totals.get(k, 0.0) + (v if k == "tokens" else v / n)
        self.update()
        self.stats = totals
        return share
