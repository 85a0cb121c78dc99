"""``trial --reactor=tfscache-asyncio``: tfscache's reactor on the standard library's asyncio
loop, for the tests (see ``tfscache.reactor``)."""

from tfscache.reactor import install_stdlib as install

__all__ = ["install"]
