"""Where frames come from: inputs (files, folders, globs, @lists, URLs), URL downloads, the
probe and sampling plan of a video, and its decoding in the background; and the user's own
text files (data and label files), read within bounds (textfiles.py)."""
