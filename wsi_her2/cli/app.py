"""``wsi-her2 app``: a local web page to tile and score one slide, an image or the demo slide."""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("app", help="a local web page: upload a slide or image (or run the demo), see the call and pictures",
                       description="Start a local web page (Gradio) that tiles and scores uploads like `wsi-her2 tile` "
                                   "and `wsi-her2 score`. Needs the app extra: pip install 'wsi-her2[app]'.")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this computer only; 0.0.0.0 opens it to the network)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument("--no-browser", action="store_true", help="do not open a browser tab")
    p.add_argument("--work-dir", default=None,
                   help="folder for each run's outputs, one sub-folder per run (default: a temporary folder removed on exit)")
    p.add_argument("--max-upload-mb", type=float, default=2048.0, help="largest upload accepted, in MB (default 2048)")
    p.add_argument("--workers", type=int, default=None, help="tiling threads (default: cores, at most 8)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from wsi_her2.app import AppSettings, serve
    from wsi_her2.errors import ConfigError

    if not 0 < args.port < 65536:
        raise ConfigError(f"--port {args.port}: choose a port in 1-65535")
    if args.max_upload_mb <= 0:
        raise ConfigError("--max-upload-mb must be positive")
    with tempfile.TemporaryDirectory(prefix="wsi-her2-app-") as tmp:
        work_dir = Path(args.work_dir) if args.work_dir else Path(tmp)
        settings = AppSettings(work_dir=work_dir, max_upload_mb=args.max_upload_mb, workers=args.workers)
        print(f"wsi-her2 app: http://{args.host}:{args.port}  (runs in {work_dir}; Ctrl+C stops)", file=sys.stderr)
        from wsi_her2.cli.common import use_one_torch_thread_on_cpu, use_worker_threads_for_opencv
        from wsi_her2.score.scorer import DEFAULT_MODEL

        use_worker_threads_for_opencv()  # the app process tiles and scores as the commands do
        use_one_torch_thread_on_cpu(DEFAULT_MODEL, "auto")
        try:
            serve(settings, host=args.host, port=args.port, open_browser=not args.no_browser)
        except OSError as exc:  # e.g. the port is taken
            raise ConfigError(f"cannot serve on {args.host}:{args.port}: {exc}; try another --port") from exc
    return 0
