"""The library the scripts call. Importing it has no side effects: no downloads, no device selection, no file
access. `data` (annotations, images, the features pickle), `extraction` (the resumable encoder pass), `inference`
(the Captioner API), `metrics` (COCO caption metrics), `runtime` (precision and thread rules), `cli` and
`choices` (the flags several scripts share, without torch), `outputs` (output paths), `original_decoding` (the
original beam search, a reference)."""
