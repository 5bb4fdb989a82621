"""An RTSP server on 127.0.0.1 for the tests of `malmm watch`, run by the system python3 with
GStreamer's RTSP server library through PyGObject (Debian: gir1.2-gst-rtsp-server-1.0
python3-gi gstreamer1.0-plugins-good gstreamer1.0-plugins-ugly). It serves a live synthetic
H.264 stream at rtsp://127.0.0.1:PORT/test, prints PORT, and serves until it is killed.

`rtsp_server.py --check` exits 0 when all of that is installed (tests skip otherwise).
"""

import sys

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import GLib, Gst, GstRtspServer  # noqa: E402

PIPELINE = ("( videotestsrc is-live=true pattern=ball ! video/x-raw,width=96,height=64,framerate=10/1 "
            "! x264enc tune=zerolatency speed-preset=ultrafast key-int-max=10 ! rtph264pay name=pay0 pt=96 )")

Gst.init(None)
if "--check" in sys.argv:
    missing = [e for e in ("videotestsrc", "x264enc", "rtph264pay") if Gst.ElementFactory.find(e) is None]
    if missing:
        sys.exit(f"GStreamer has no {', '.join(missing)} (apt-get install gstreamer1.0-plugins-good "
                 "gstreamer1.0-plugins-ugly)")
    sys.exit(0)
server = GstRtspServer.RTSPServer()
server.set_address("127.0.0.1")  # loopback only
server.set_service("0")  # a free port, printed below
factory = GstRtspServer.RTSPMediaFactory()
factory.set_launch(PIPELINE)
factory.set_shared(True)
server.get_mount_points().add_factory("/test", factory)
server.attach(None)
print(server.get_bound_port(), flush=True)
GLib.MainLoop().run()
