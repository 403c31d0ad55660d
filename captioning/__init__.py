"""The library the scripts call. Importing it has no side effects: no downloads, no device selection, no file
access. `runtime`: the precision and thread rules; `cli`: the flags several scripts share."""
