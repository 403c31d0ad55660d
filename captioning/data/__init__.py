"""The captioner's data, each file format read in one place and written in one place: `annotations` (annotation
files -> ImageRecord), `images` (image files -> RGB), `features` (the features pickle)."""
