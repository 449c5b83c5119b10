"""Renders a Vega-Lite spec to SVG and PNG with vl-convert (PyPI: vl-convert-python).

    python3 bench/support/render_vl.py spec.vl.json out.svg out.png

Exits 3 when vl-convert is not installed, so that bench/run.exs can say so.
"""

import sys

try:
    import vl_convert as vlc
except ImportError:
    sys.exit(3)

spec_path, svg_path, png_path = sys.argv[1:4]
with open(spec_path) as f:
    spec = f.read()
with open(svg_path, "w") as f:
    f.write(vlc.vegalite_to_svg(spec))
with open(png_path, "wb") as f:
    f.write(vlc.vegalite_to_png(spec, scale=2))
