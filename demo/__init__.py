"""The OVDiff Explorer Gradio app: :func:`build_demo` returns the ``gr.Blocks``.

``demo.inputs`` validates uploads, names and clicks; ``demo.render`` draws overlays,
legends, heatmaps and charts; ``demo.models`` chooses the backend; ``demo.tab_*`` (and
``demo.panel_whatif``) are the tabs, each with its handlers, layout and wiring;
``demo.app`` holds the shared state and assembles them.
Importing this package does not import Gradio; importing ``demo.app`` does.
"""

__all__ = ["build_demo"]


def __getattr__(name: str):  # lazy: keep `import demo.inputs` free of gradio
    if name == "build_demo":
        from demo.app import build_demo

        return build_demo
    raise AttributeError(name)
