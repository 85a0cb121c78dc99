"""twistd entry point: ``twistd -n tfscache --config FILE``."""

from twisted.application.service import ServiceMaker

serviceMaker = ServiceMaker(
    "tfscache",
    "tfscache.tap",
    "A model cache in front of TensorFlow Serving",
    "tfscache",
)
