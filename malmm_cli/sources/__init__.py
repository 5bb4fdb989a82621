"""Where frames come from: inputs (files, folders, globs, @lists, URLs), URL downloads, the
probe and sampling plan of a video, and its decoding in the background."""
