"""Deterministic rendering of document pages and text crops with Pillow.

Fonts are pinned by path: the DejaVu / STIX TrueType files in matplotlib's package data
(``matplotlib/mpl-data/fonts/ttf``), located without importing matplotlib. Words come from the
Zen of Python (the ``this`` module) and docstrings of a fixed list of stdlib modules, so the
text is real English prose and identical on every machine with the same Python version.
Charts inside pages are drawn by matplotlib's Agg canvas (no pyplot, no font fallback lists).
"""

from __future__ import annotations

import codecs
import contextlib
import functools
import importlib.util
import inspect
import io
import re
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

# Stdlib modules whose docstrings feed the corpus (fixed order: determinism).
_DOC_MODULES = ("textwrap", "collections", "functools", "itertools", "json", "string", "pathlib",
                "argparse", "logging", "heapq", "bisect", "fractions", "statistics", "difflib",
                "shutil", "tempfile", "calendar", "decimal", "random", "csv", "zipfile", "pickle")
_TOKEN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9,.;:()'\-]*$")


def font_dir() -> Path:
    spec = importlib.util.find_spec("matplotlib")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("matplotlib is not installed; its bundled fonts are needed")
    path = Path(list(spec.submodule_search_locations)[0]) / "mpl-data" / "fonts" / "ttf"
    if not (path / "DejaVuSans.ttf").is_file():
        raise FileNotFoundError(f"no DejaVuSans.ttf under {path}")
    return path


@functools.lru_cache(maxsize=256)
def font(name: str, size: int) -> ImageFont.FreeTypeFont:
    """A TrueType font from matplotlib's data, e.g. ``font('DejaVuSerif', 20)``."""
    return ImageFont.truetype(str(font_dir() / f"{name}.ttf"), int(size))


BODY_FONTS = ("DejaVuSerif", "DejaVuSans", "STIXGeneral", "cmr10")
BOLD = {"DejaVuSerif": "DejaVuSerif-Bold", "DejaVuSans": "DejaVuSans-Bold",
        "STIXGeneral": "STIXGeneralBol", "cmr10": "cmb10"}
ITALIC = {"DejaVuSerif": "DejaVuSerif-Italic", "DejaVuSans": "DejaVuSans-Oblique",
          "STIXGeneral": "STIXGeneralItalic", "cmr10": "cmti10"}


@functools.lru_cache(maxsize=1)
def corpus() -> tuple[str, ...]:
    """Real English words (with their punctuation) in reading order."""
    import this  # noqa: F401  (prints the Zen once on first import; silenced below)

    texts = [codecs.decode(this.s, "rot13")]
    for name in _DOC_MODULES:
        with contextlib.suppress(ImportError):
            module = __import__(name)
            texts.append(module.__doc__ or "")
            for attr in sorted(vars(module)):
                obj = getattr(module, attr)
                if attr.startswith("_") or not (inspect.isfunction(obj) or inspect.isclass(obj)):
                    continue
                if getattr(obj, "__module__", None) == name and isinstance(obj.__doc__, str):
                    texts.append(obj.__doc__)
    words = [w for t in texts for w in t.split() if _TOKEN.match(w) and len(w) < 18]
    return tuple(words)


def _silent_import_this() -> None:
    with contextlib.redirect_stdout(io.StringIO()):
        import this  # noqa: F401


_silent_import_this()


def words(rng: np.random.Generator, n: int) -> list[str]:
    """``n`` consecutive corpus words from a random place: reads like real prose."""
    c = corpus()
    start = int(rng.integers(0, len(c) - n - 1)) if len(c) > n + 1 else 0
    out = list(c[start:start + n])
    while len(out) < n:
        out += list(c[:n - len(out)])
    return out


def sentence(rng: np.random.Generator, lo: int, hi: int, title_case: bool = False) -> str:
    ws = [w.strip(",.;:()'") or w for w in words(rng, int(rng.integers(lo, hi + 1)))]
    ws = [w for w in ws if w]
    if title_case:
        return " ".join(w[:1].upper() + w[1:] for w in ws)
    return (" ".join(ws)[:1].upper() + " ".join(ws)[1:]) if ws else "Text"


def wrap(text_words: list[str], fnt: ImageFont.FreeTypeFont, width: int) -> list[list[str]]:
    space = fnt.getlength(" ")
    lines, line, used = [], [], 0.0
    for w in text_words:
        wl = fnt.getlength(w)
        if line and used + space + wl > width:
            lines.append(line)
            line, used = [w], wl
        else:
            used = used + space + wl if line else wl
            line.append(w)
    if line:
        lines.append(line)
    return lines


def draw_line(draw: ImageDraw.ImageDraw, x: float, y: float, line: list[str], fnt, width: int,
              justify: bool, fill) -> None:
    """One text line with its baseline at y; justified lines stretch the gaps to ``width``."""
    if not justify or len(line) < 2:
        draw.text((x, y), " ".join(line), font=fnt, fill=fill, anchor="ls")
        return
    lengths = [fnt.getlength(w) for w in line]
    gap = (width - sum(lengths)) / (len(line) - 1)
    if gap > 3 * fnt.getlength(" ") + 2:
        draw.text((x, y), " ".join(line), font=fnt, fill=fill, anchor="ls")
        return
    for w, wl in zip(line, lengths):
        draw.text((x, y), w, font=fnt, fill=fill, anchor="ls")
        x += wl + gap


def paragraph(draw, rng, x, y, width, fnt, leading, max_y, fill=(20, 20, 20), n_words=None,
              indent=0, justify=True, text_words=None) -> float:
    """Draw a paragraph from (x, y) (top of the first line); returns the y below it."""
    tw = text_words if text_words is not None else words(rng, int(n_words or rng.integers(25, 110)))
    if indent:
        tw = list(tw)
    lines = wrap(tw, fnt, width - indent) if indent else wrap(tw, fnt, width)
    size = fnt.size
    for i, line in enumerate(lines):
        base = y + size
        if base > max_y:
            break
        dx = indent if i == 0 else 0
        draw_line(draw, x + dx, base, line, fnt, width - dx, justify and i < len(lines) - 1, fill)
        y += leading
    return y


# --------------------------------------------------------------------------- page elements

def _chart(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    """A matplotlib chart (line, bar or scatter) rendered to an RGB image of about w x h pixels."""
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    dpi = 100
    with matplotlib.rc_context({"font.family": "DejaVu Sans", "font.size": float(rng.uniform(7, 10)),
                                "axes.prop_cycle": matplotlib.cycler(color=["#1f77b4", "#d62728", "#2ca02c",
                                                                            "#ff7f0e", "#555555"]),
                                "svg.hashsalt": "qinject", "path.simplify": True}):
        fig = Figure(figsize=(max(w, 60) / dpi, max(h, 60) / dpi), dpi=dpi)
        canvas = FigureCanvasAgg(fig)
        ax = fig.add_subplot(111)
        kind = int(rng.integers(0, 4))
        x = np.linspace(0, float(rng.uniform(5, 50)), 40)
        if kind == 0:
            for k in range(int(rng.integers(1, 4))):
                ax.plot(x, np.cumsum(rng.normal(0, 1, x.size)) + k * 3, lw=1.2,
                        marker="o" if rng.random() < 0.3 else None, ms=2.5, label=f"model {k + 1}")
            ax.legend(fontsize="small", frameon=rng.random() < 0.5)
        elif kind == 1:
            cats = [w_.strip(",.;:()'")[:8] for w_ in words(rng, int(rng.integers(3, 7)))]
            ax.bar(range(len(cats)), rng.uniform(1, 10, len(cats)), color="#4c72b0")
            ax.set_xticks(range(len(cats)), cats, rotation=30 if rng.random() < 0.5 else 0)
        elif kind == 2:
            pts = rng.normal(0, 1, (int(rng.integers(30, 120)), 2))
            ax.scatter(pts[:, 0], pts[:, 0] * rng.uniform(-1, 1) + pts[:, 1], s=6)
        else:
            ax.plot(x, np.exp(-x / x.max() * 3) + rng.normal(0, 0.02, x.size), lw=1.5)
            ax.fill_between(x, 0, np.exp(-x / x.max() * 3), alpha=0.2)
        if rng.random() < 0.6:
            ax.set_xlabel(sentence(rng, 1, 2))
            ax.set_ylabel(sentence(rng, 1, 2))
        if rng.random() < 0.3:
            ax.grid(True, lw=0.4)
        fig.subplots_adjust(left=0.13, bottom=0.17 if kind == 1 else 0.14, right=0.97, top=0.96)
        canvas.draw()
        img = Image.frombuffer("RGBA", canvas.get_width_height(), bytes(canvas.buffer_rgba()), "raw",
                               "RGBA", 0, 1)
    return img.convert("RGB")


def _table(draw, rng, x, y, width, fnt, bold, max_y) -> float:
    rows, cols = int(rng.integers(3, 9)), int(rng.integers(3, 7))
    row_h = int(fnt.size * rng.uniform(1.5, 2.0))
    if y + row_h * (rows + 1) > max_y:
        rows = max(2, int((max_y - y) // row_h) - 1)
    if y + row_h * (rows + 1) > max_y:
        return y
    col_w = width / cols
    grid = rng.random() < 0.5
    lw = 1 if rng.random() < 0.7 else 2
    top, bottom = y, y + row_h * (rows + 1)
    ink = (30, 30, 30)
    for r in range(rows + 1):
        base = y + r * row_h + row_h * 0.5 + fnt.size * 0.35
        for c in range(cols):
            if r == 0:
                txt, f = sentence(rng, 1, 1), bold
            elif c == 0:
                txt, f = words(rng, 1)[0].strip(",.;:()'")[:12], fnt
            else:
                txt, f = f"{rng.uniform(0, 100):.{int(rng.integers(0, 3))}f}", fnt
            while f.getlength(txt) > col_w - 6 and len(txt) > 2:
                txt = txt[:-1]
            tx = x + c * col_w + (4 if c == 0 else (col_w - f.getlength(txt)) / 2)
            draw.text((tx, base), txt, font=f, fill=ink, anchor="ls")
    if grid:
        for r in range(rows + 2):
            draw.line([(x, y + r * row_h), (x + width, y + r * row_h)], fill=ink, width=lw)
        for c in range(cols + 1):
            draw.line([(x + c * col_w, top), (x + c * col_w, bottom)], fill=ink, width=lw)
    else:  # three-line table (booktabs)
        for yy, wd in ((top, lw + 1), (top + row_h, lw), (bottom, lw + 1)):
            draw.line([(x, yy), (x + width, yy)], fill=ink, width=wd)
    return bottom


_GREEK = "αβγδεθλμπσφωΔΣΩ"
_VARS = "xyztnkabcfgh"


def _equation(rng) -> str:
    g = lambda: _GREEK[int(rng.integers(0, len(_GREEK)))]  # noqa: E731
    v = lambda: _VARS[int(rng.integers(0, len(_VARS)))]  # noqa: E731
    terms = [f"{g()}{v()}²", f"∑ᵢ {v()}ᵢ {g()}ᵢ", f"∫ {v()}({v()}) d{v()}", f"√({v()} + {g()})",
             f"{rng.integers(2, 9)}{v()}", f"log {v()}", f"exp(−{g()}{v()})", f"‖{v()} − {v()}‖²",
             f"({v()} − {g()})/{rng.integers(2, 9)}", f"∂{v()}/∂{g()}"]
    rhs = [terms[i] for i in rng.permutation(len(terms))[: int(rng.integers(2, 5))]]
    ops = [" + ", " − ", " · "]
    out = rhs[0]
    for t in rhs[1:]:
        out += ops[int(rng.integers(0, 3))] + t
    lhs = f"{v()}({v()})" if rng.random() < 0.5 else g()
    rel = ["=", "≤", "≈", "="][int(rng.integers(0, 4))]
    return f"{lhs} {rel} {out}"


def render_page(rng: np.random.Generator, photo=None) -> Image.Image:
    """A document page (RGB) with header, title, paragraphs, tables, figures, equations, footer.

    ``photo(rng, w, h)`` (optional) returns an RGB uint8 photo used for some figures.
    """
    W = int(rng.integers(820, 1150))
    H = int(W * (1.414 if rng.random() < 0.7 else 1.294))
    paper = tuple(int(v) for v in 255 - rng.integers(0, [8, 8, 14]))
    img = Image.new("RGB", (W, H), paper)
    draw = ImageDraw.Draw(img)
    family = BODY_FONTS[int(rng.integers(0, len(BODY_FONTS)))]
    size = int(W * rng.uniform(0.0125, 0.018))
    body, bold, ital = font(family, size), font(BOLD[family], size), font(ITALIC[family], size)
    leading = int(size * rng.uniform(1.25, 1.55))
    margin_x = int(W * rng.uniform(0.06, 0.11))
    margin_top = int(H * rng.uniform(0.05, 0.08))
    margin_bot = int(H * rng.uniform(0.05, 0.08))
    ink = (int(rng.integers(0, 40)),) * 3
    x0, x1 = margin_x, W - margin_x

    # header
    y = margin_top
    if rng.random() < 0.75:
        small = font(ITALIC[family] if rng.random() < 0.5 else family, int(size * 0.8))
        hy = int(margin_top * 0.6)
        draw.text((x0, hy), sentence(rng, 2, 6, title_case=True), font=small, fill=ink, anchor="ls")
        if rng.random() < 0.6:
            right = f"Vol. {rng.integers(1, 40)}, No. {rng.integers(1, 12)}"
            draw.text((x1, hy), right, font=small, fill=ink, anchor="rs")
        if rng.random() < 0.6:
            draw.line([(x0, hy + size * 0.4), (x1, hy + size * 0.4)], fill=ink, width=1)
    # footer / page number
    page_no = str(int(rng.integers(1, 400)))
    fy = H - int(margin_bot * 0.45)
    small = font(family, int(size * 0.85))
    pos = rng.random()
    if pos < 0.5:
        draw.text((W / 2, fy), page_no, font=small, fill=ink, anchor="ms")
    else:
        draw.text((x1, fy), page_no, font=small, fill=ink, anchor="rs")
        if rng.random() < 0.5:
            draw.text((x0, fy), sentence(rng, 3, 8), font=font(family, int(size * 0.75)), fill=ink,
                      anchor="ls")
    max_y = H - margin_bot - size

    # title block
    if rng.random() < 0.6:
        tsize = int(size * rng.uniform(1.6, 2.6))
        tfont = font(BOLD[family] if rng.random() < 0.8 else family, tsize)
        title_words = sentence(rng, 4, 14, title_case=True).split()
        for line in wrap(title_words, tfont, int((x1 - x0) * 0.85)):
            y += int(tsize * 1.25)
            draw.text((W / 2, y), " ".join(line), font=tfont, fill=ink, anchor="ms")
        if rng.random() < 0.7:
            y += int(size * 1.8)
            names = ", ".join(w.strip(",.;:()'").capitalize() for w in words(rng, int(rng.integers(2, 5))))
            draw.text((W / 2, y), names, font=ital, fill=ink, anchor="ms")
        y += int(size * 2.0)
        if rng.random() < 0.5:  # abstract
            ax0, ax1 = x0 + int(W * 0.06), x1 - int(W * 0.06)
            draw.text((W / 2, y + size), "Abstract", font=bold, fill=ink, anchor="ms")
            y = paragraph(draw, rng, ax0, y + int(size * 1.5), ax1 - ax0, font(family, int(size * 0.9)),
                          int(leading * 0.9), max_y, ink, n_words=int(rng.integers(50, 120)))
            y += size
    ncols = 1 if rng.random() < 0.45 else 2
    gutter = int(W * rng.uniform(0.03, 0.05))
    col_w = (x1 - x0 - gutter * (ncols - 1)) // ncols
    col_x = [x0 + c * (col_w + gutter) for c in range(ncols)]
    fig_no, tab_no, eq_no, sec_no = (int(rng.integers(1, 8)) for _ in range(4))

    for c in range(ncols):
        cy = y
        cx = col_x[c]
        while cy < max_y - 3 * leading:
            kind = rng.choice(["para", "para", "para", "head", "figure", "table", "equation", "refs"],
                              p=[0.25, 0.15, 0.1, 0.14, 0.12, 0.1, 0.08, 0.06])
            if kind == "para":
                cy = paragraph(draw, rng, cx, cy, col_w, body, leading, max_y, ink,
                               indent=int(size * 1.5) if rng.random() < 0.5 else 0,
                               justify=rng.random() < 0.75) + int(leading * rng.uniform(0.2, 0.8))
            elif kind == "head":
                hsize = int(size * rng.uniform(1.1, 1.5))
                hf = font(BOLD[family], hsize)
                txt = f"{sec_no}. {sentence(rng, 1, 5, title_case=True)}" if rng.random() < 0.7 else \
                    sentence(rng, 1, 5, title_case=True)
                sec_no += 1
                while hf.getlength(txt) > col_w and " " in txt:
                    txt = txt.rsplit(" ", 1)[0]
                cy += int(hsize * 0.8)
                draw.text((cx, cy + hsize), txt, font=hf, fill=ink, anchor="ls")
                cy += int(hsize * 1.9)
            elif kind == "figure":
                fw = int(col_w * (rng.uniform(0.55, 0.95) if ncols == 1 else rng.uniform(0.85, 1.0)))
                fh = int(fw * rng.uniform(0.45, 0.8))
                if cy + fh + 3 * leading > max_y:
                    if cy + 6 * leading > max_y:
                        break
                    continue
                if photo is not None and rng.random() < 0.3:
                    fig = Image.fromarray(photo(rng, fw, fh))
                else:
                    fig = _chart(rng, fw, fh)
                fx = cx + (col_w - fig.width) // 2
                img.paste(fig, (fx, int(cy)))
                cy += fig.height + int(size * 0.6)
                cap = [f"Figure {fig_no}."] + words(rng, int(rng.integers(5, 30)))
                fig_no += 1
                cfont = font(family, int(size * 0.9))
                cy = paragraph(draw, rng, cx, cy, col_w, cfont, int(leading * 0.9), max_y, ink,
                               text_words=cap, justify=False) + leading
            elif kind == "table":
                cap = [f"Table {tab_no}:"] + words(rng, int(rng.integers(4, 20)))
                tab_no += 1
                cfont = font(family, int(size * 0.9))
                y_cap = paragraph(draw, rng, cx, cy, col_w, cfont, int(leading * 0.9), max_y, ink,
                                  text_words=cap, justify=False) + int(size * 0.3)
                cy = _table(draw, rng, cx, y_cap, col_w, font(family, int(size * 0.85)),
                            font(BOLD[family], int(size * 0.85)), max_y) + leading
            elif kind == "equation":
                efont = font("DejaVuSerif-Italic" if rng.random() < 0.6 else "DejaVuSerif", int(size * 1.1))
                eq = _equation(rng)
                while efont.getlength(eq) > col_w * 0.85 and len(eq) > 10:
                    eq = eq[: int(len(eq) * 0.8)].rstrip(" +−·")
                cy += int(size * 0.8)
                draw.text((cx + col_w / 2, cy + size), eq, font=efont, fill=ink, anchor="ms")
                draw.text((cx + col_w, cy + size), f"({eq_no})", font=body, fill=ink, anchor="rs")
                eq_no += 1
                cy += int(size * 2.4)
            else:  # references
                cy += leading
                draw.text((cx, cy + size), "References", font=bold, fill=ink, anchor="ls")
                cy += int(leading * 1.6)
                rfont = font(family, int(size * 0.85))
                for k in range(int(rng.integers(3, 8))):
                    ref = [f"[{k + 1}]"] + [w.capitalize() for w in words(rng, 2)] + \
                        words(rng, int(rng.integers(8, 20))) + \
                        [f"{int(rng.integers(1950, 2024))}."]
                    cy = paragraph(draw, rng, cx, cy, col_w, rfont, int(leading * 0.85), max_y, ink,
                                   text_words=ref, justify=False) + int(size * 0.3)
                    if cy > max_y:
                        break
    return img


def text_block(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    """A crop of a printed text region (lines or paragraphs) filling w x h, upright (RGB)."""
    paper = tuple(int(v) for v in 255 - rng.integers(0, [20, 20, 30]))
    img = Image.new("RGB", (w, h), paper)
    draw = ImageDraw.Draw(img)
    family = BODY_FONTS[int(rng.integers(0, len(BODY_FONTS)))]
    size = int(min(w, h) * rng.uniform(0.05, 0.12))
    size = max(size, 11)
    grey = (int(rng.integers(0, 50)),) * 3
    ink = tuple(int(v) for v in rng.integers(0, 60, 3)) if rng.random() < 0.2 else grey
    leading = int(size * rng.uniform(1.2, 1.7))
    margin = int(size * rng.uniform(0.2, 1.5))
    y = -int(size * rng.uniform(0, 0.8))  # crops may cut the first line
    x = margin - (int(size * rng.uniform(0, 4)) if rng.random() < 0.3 else 0)
    while y < h:
        if rng.random() < 0.15:
            hf = font(BOLD[family], int(size * rng.uniform(1.1, 1.6)))
            draw.text((x, y + hf.size), sentence(rng, 2, 6, title_case=True), font=hf, fill=ink, anchor="ls")
            y += int(hf.size * 1.7)
        fnt = font(family if rng.random() < 0.85 else ITALIC[family], size)
        y = paragraph(draw, rng, x, y, w - x - margin + int(size * rng.uniform(0, 6)), fnt, leading, h + size,
                      ink, n_words=int(rng.integers(15, 80)),
                      indent=int(size * 2) if rng.random() < 0.4 else 0,
                      justify=rng.random() < 0.6)
        y += int(leading * rng.uniform(0.0, 0.9))
    return img


def scan_noise(rng: np.random.Generator, img: Image.Image, max_angle: float = 1.0) -> np.ndarray:
    """Scanner/camera degradations: slight rotation, blur, uneven lighting, sensor noise, JPEG."""
    if rng.random() < 0.5:
        bg = img.getpixel((2, 2))
        img = img.rotate(float(rng.uniform(-max_angle, max_angle)), resample=Image.NEAREST, fillcolor=bg)
    if rng.random() < 0.4:
        img = img.filter(ImageFilter.BoxBlur(float(rng.uniform(0.4, 1.0))))
    a = np.asarray(img, dtype=np.float32)
    h, w = a.shape[:2]
    if rng.random() < 0.6:  # uneven illumination: a smooth ramp
        gy = np.linspace(-1, 1, h, dtype=np.float32)[:, None]
        gx = np.linspace(-1, 1, w, dtype=np.float32)[None, :]
        ramp = 1 - np.float32(rng.uniform(0, 0.12)) * (np.float32(rng.uniform(-1, 1)) * gx
                                                       + np.float32(rng.uniform(-1, 1)) * gy + 1) / 2
        a *= ramp[..., None]
    sigma = float(rng.uniform(0, 6))
    if sigma > 0.5:
        noise = rng.standard_normal((h, w, 1), dtype=np.float32)
        noise *= np.float32(sigma)
        a += noise
    a += np.float32(0.5)
    np.clip(a, 0, 255, out=a)
    out = a.astype(np.uint8)
    if rng.random() < 0.4:
        buf = io.BytesIO()
        Image.fromarray(out).save(buf, format="JPEG", quality=int(rng.integers(60, 95)))
        out = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    return out
