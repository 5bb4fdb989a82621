"""What comes out of an analysis: records, job keys, claiming -o and --resume, the writers
(txt, json, srt, vtt, md, html), the progress events and their terminal view."""
