"""Which handler answers a plain HTTP request on the `-p` port: R scripts or the document root.

The request target is parsed and checked once here (static.parse_target), then the decoded path
decides: `.R` scripts, `.R/` with path info, `/library/` and `/doc/` go to R (rscript.py),
everything else to the document root (static.py; both in docs/static.md). A `Refusal` raised
anywhere below becomes its HTTP answer in this one place; the server goes on serving.
"""

from __future__ import annotations

from aiohttp import web

from .app import Handler
from .config import Config, ConfigError
from .rscript import RScripts, is_rscript
from .static import DocRoot, Refusal, StaticFiles, parse_target


def make_http_handler(config: Config) -> Handler:
    """The handler for non-WebSocket requests; raises ConfigError if `-r` is not a directory."""
    try:
        docroot = DocRoot.open(config.doc_root, config.follow_symlinks, config.serve_dotfiles)
    except OSError:
        raise ConfigError(f"-r {config.doc_root}: not a directory") from None
    static = StaticFiles(docroot)
    rscripts = RScripts.from_config(config, docroot)

    async def handle(request: web.Request) -> web.StreamResponse:
        try:
            target = parse_target(request.raw_path)
            if is_rscript(target.path):
                return await rscripts.handle(request, target)
            return await static.handle(request, target)
        except Refusal as refusal:
            return refusal.response()

    return handle
