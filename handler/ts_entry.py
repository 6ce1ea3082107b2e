"""TorchServe entry point, copied to the archive root beside the ``handler`` package.

TorchServe calls ``handle(None, context)`` once to initialise, then ``handle(data, context)``
per batch. The archive's packages are checked before the handler (torch, Pillow, timm...) is
imported, so a server without them fails the load with a message that says what to do.
"""

from pathlib import Path

_service = None


def handle(data, context):
    """Initialise on first call; answer a batch afterwards."""
    global _service
    if _service is None:
        from handler.deps import check_requirements

        check_requirements(Path(context.system_properties["model_dir"]))
        from handler.service import GradCamHandler

        service = GradCamHandler()
        service.initialize(context)
        _service = service  # only once initialised: a failed load is retried from scratch
    if data is None:
        return None
    return _service.handle(data, context)
