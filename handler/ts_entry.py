"""TorchServe entry point, copied to the archive root beside the ``handler`` package.

TorchServe calls ``handle(None, context)`` once to initialise, then ``handle(data, context)``
per batch.
"""

from handler.service import GradCamHandler

_service = GradCamHandler()


def handle(data, context):
    """Initialise on first call; answer a batch afterwards."""
    if not _service.initialized:
        _service.initialize(context)
    if data is None:
        return None
    return _service.handle(data, context)
