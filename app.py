"""Launch OVDiff Explorer: ``python app.py [--backend real|tiny|color] [--preset cpu|paper]``.

``--backend tiny`` runs the identical UI offline with tiny random-weight models (CI);
``--backend color`` runs it on the colour world, with no neural network at all.
The backend can also be set with the ``OVDIFF_BACKEND`` environment variable; a Space
owner's other settings (presets, limits, cache folder, names built at start-up) are the
``OVDIFF_*`` variables of :mod:`demo.hosting`. Serves on 127.0.0.1 only unless ``--host``
says so (on a Space, Gradio binds where the Space needs).
"""

import argparse
import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from demo.app import CSS, MARKER_JS, build_demo
from demo.hosting import HostingConfig, limit_malloc_arenas
from demo.models import ASSETS, BACKENDS, PRESETS, make_model_factory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--backend", choices=BACKENDS, default=os.environ.get("OVDIFF_BACKEND", "real")
    )
    parser.add_argument("--preset", choices=PRESETS, default="cpu")
    parser.add_argument("--host", default="0.0.0.0" if os.environ.get("SPACE_ID") else "127.0.0.1")
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", 7860)))
    parser.add_argument("--cache-dir", default=None, help="default: $OVDIFF_CACHE, /data, ~/.cache")
    args = parser.parse_args()
    if args.backend not in BACKENDS:
        parser.error(f"OVDIFF_BACKEND must be one of {BACKENDS}, got {args.backend!r}")
    limit_malloc_arenas()  # resident memory levels off in a server that runs for weeks
    try:
        hosting = HostingConfig.from_env()
    except ValueError as err:
        parser.error(str(err))
    cache_dir = args.cache_dir or hosting.cache_dir
    demo = build_demo(
        make_model_factory(args.backend, cache_dir),
        backend=args.backend,
        default_preset=args.preset,
        hosting=hosting,
    )
    # ZeroGPU: models are loaded here, at start-up, outside any GPU call (its documented
    # practice); elsewhere they load on first use, with progress shown in the page.
    demo.ovdiff_app.start(preload=hosting.zero_gpu)
    demo.launch(
        server_name=args.host,
        server_port=args.port,
        share=False,
        css=CSS,
        js=MARKER_JS,
        allowed_paths=[str(ASSETS)],
        footer_links=["api", "settings"],
        run_history=False,  # no copies of visitors' runs in browser storage (and faster)
        state_session_capacity=hosting.max_sessions,  # least recently used sessions dropped
    )


if __name__ == "__main__":
    main()
