"""twistd entry point: ``twistd -n tfscache --config FILE``; and the reactor it runs on,
``tfscache`` (``twistd -r tfscache``, ``trial --reactor=tfscache``): asyncio on uvloop."""

from twisted.application.reactors import Reactor
from twisted.application.service import ServiceMaker

serviceMaker = ServiceMaker(
    "tfscache",
    "tfscache.tap",
    "A model cache in front of TensorFlow Serving",
    "tfscache",
)

tfscacheReactor = Reactor("tfscache", "tfscache.reactor", "asyncio on uvloop, as tfscache runs (grpc.aio)")

tfscacheAsyncioReactor = Reactor("tfscache-asyncio", "tfscache.stdlib_reactor",
                                 "the same on the standard library's loop (the tests)")
