"""Procedural natural-looking photos (numpy + Pillow), deterministic for a given RNG.

Outdoor scenes (sky gradient, clouds, hills, textured ground), indoor scenes (walls, floor,
window, furniture) and portraits, with 0-3 people-like figures (skin-toned head with hair and
facial features, neck, clothed or bare torso, arms, legs, feet), soft-edged blobs, and camera
effects: lighting gain/gamma, directional light, vignette, blur, sensor noise and a real JPEG
round trip (Pillow's bundled libjpeg).
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SKIN = np.array([(255, 224, 196), (241, 194, 165), (224, 172, 135), (198, 134, 102), (161, 102, 70),
                 (141, 85, 54), (110, 70, 48), (92, 58, 40)], dtype=np.float32)
FURNITURE = [(110, 75, 45), (60, 60, 70), (150, 60, 50), (200, 190, 170)]
PANTS = [(40, 50, 90), (30, 30, 35), (120, 100, 80), (200, 200, 190)]
HAIR = np.array([(20, 15, 12), (45, 30, 20), (85, 55, 30), (150, 110, 60), (200, 170, 110), (110, 110, 110)],
                dtype=np.float32)


def _col(rng, base, jitter=12.0) -> tuple[int, int, int]:
    c = np.asarray(base, dtype=np.float32) + rng.normal(0, jitter, 3)
    return tuple(int(v) for v in np.clip(c, 0, 255))


def fractal_noise(rng: np.random.Generator, h: int, w: int, octaves=(4, 8, 16, 32, 64),
                  decay=0.6) -> np.ndarray:
    """Smooth multi-scale noise in [-1, 1]-ish (sum of bicubically upsampled random grids)."""
    out = np.zeros((h, w), np.float32)
    amp, total = 1.0, 0.0
    for cells in octaves:
        gh, gw = max(2, int(h * cells / max(h, w)) + 2), max(2, int(w * cells / max(h, w)) + 2)
        grid = Image.fromarray(rng.normal(0, 1, (gh, gw)).astype(np.float32), mode="F")
        out += amp * np.asarray(grid.resize((w, h), Image.BICUBIC), dtype=np.float32)
        total += amp
        amp *= decay
    return out / total


def _vgrad(h, w, top, bottom, power=1.0) -> np.ndarray:
    t = np.linspace(0, 1, h, dtype=np.float32)[:, None, None] ** power
    return np.broadcast_to((1 - t) * np.float32(top) + t * np.float32(bottom), (h, w, 3)).copy()


def _outdoor(rng, h, w) -> tuple[np.ndarray, int]:
    horizon = int(h * rng.uniform(0.3, 0.65))
    mood = rng.random()
    if mood < 0.6:
        top, low = _col(rng, (70, 130, 210), 20), _col(rng, (185, 215, 240), 12)
    elif mood < 0.8:
        top, low = _col(rng, (60, 70, 120), 15), _col(rng, (250, 170, 110), 15)  # sunset
    else:
        top, low = _col(rng, (150, 155, 165), 10), _col(rng, (205, 205, 210), 8)  # overcast
    img = _vgrad(h, w, top, low, power=0.8)
    clouds = np.clip(fractal_noise(rng, h, w, (3, 6, 12, 24)) * 1.6 - rng.uniform(0.0, 0.8), 0, 1)
    img += clouds[..., None] * (np.float32(255) - img) * rng.uniform(0.4, 0.9)
    # hills: a smooth ridge line with a hazier colour
    xs = np.arange(w)
    for layer in range(int(rng.integers(1, 3))):
        ridge = horizon - h * (0.05 + 0.12 * rng.random()) * (1 + np.asarray(
            Image.fromarray(rng.normal(0, 1, (1, 8)).astype(np.float32), mode="F")
            .resize((w, 1), Image.BICUBIC))[0])
        ys = np.arange(h)[:, None]
        mask = ys >= ridge[None, xs]
        hc = np.float32(_col(rng, (90, 110, 120) if layer == 0 else (70, 100, 70), 15))
        img[mask] = img[mask] * 0.35 + hc * 0.65
    ground_base = [(80, 120, 50), (120, 100, 70), (200, 185, 150), (110, 110, 105), (60, 90, 120)]
    g = np.float32(_col(rng, ground_base[int(rng.integers(0, len(ground_base)))], 15))
    tex = fractal_noise(rng, h - horizon, w, (8, 16, 48, 128), 0.8)
    ground = g[None, None, :] * (1 + 0.25 * tex[..., None])
    ground *= np.linspace(0.85, 1.1, h - horizon, dtype=np.float32)[:, None, None]
    img[horizon:] = ground
    return img, horizon


def _indoor(rng, h, w) -> tuple[np.ndarray, int]:
    floor_y = int(h * rng.uniform(0.55, 0.85))
    walls = [(225, 220, 205), (200, 210, 220), (235, 225, 200), (180, 170, 160)]
    wall = _col(rng, walls[int(rng.integers(0, 4))], 12)
    img = _vgrad(h, w, np.array(wall) * 1.05, np.array(wall) * 0.85)
    img *= (1 + 0.05 * fractal_noise(rng, h, w, (4, 8)))[..., None]
    floors = [(140, 100, 65), (170, 160, 150), (90, 70, 55)]
    floor = np.float32(_col(rng, floors[int(rng.integers(0, 3))], 12))
    img[floor_y:] = floor * (1 + 0.15 * fractal_noise(rng, h - floor_y, w, (4, 32, 96), 0.9))[..., None]
    pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(pil)
    if rng.random() < 0.7:  # window with a bright sky
        wx, wy = int(w * rng.uniform(0.05, 0.6)), int(h * rng.uniform(0.08, 0.25))
        ww, wh = int(w * rng.uniform(0.15, 0.35)), int(h * rng.uniform(0.2, 0.35))
        d.rectangle([wx - 6, wy - 6, wx + ww + 6, wy + wh + 6], fill=_col(rng, (240, 240, 235), 5))
        d.rectangle([wx, wy, wx + ww, wy + wh], fill=_col(rng, (170, 205, 235), 15))
        d.line([(wx + ww // 2, wy), (wx + ww // 2, wy + wh)], fill=(235, 235, 230), width=5)
    for _ in range(int(rng.integers(1, 4))):  # furniture
        fx, fw = int(w * rng.uniform(-0.1, 0.9)), int(w * rng.uniform(0.15, 0.4))
        fh = int(h * rng.uniform(0.1, 0.35))
        fy = floor_y - fh + int(h * rng.uniform(0, 0.08))
        d.rounded_rectangle([fx, fy, fx + fw, fy + fh], radius=int(fh * 0.1),
                            fill=_col(rng, FURNITURE[int(rng.integers(0, 4))], 15))
    if rng.random() < 0.5:  # framed picture
        px, py = int(w * rng.uniform(0.1, 0.7)), int(h * rng.uniform(0.1, 0.3))
        pw, ph = int(w * rng.uniform(0.1, 0.2)), int(h * rng.uniform(0.1, 0.2))
        d.rectangle([px, py, px + pw, py + ph], fill=(40, 30, 20))
        d.rectangle([px + 5, py + 5, px + pw - 5, py + ph - 5], fill=_col(rng, (120, 140, 100), 50))
    return np.asarray(pil, dtype=np.float32), floor_y


def _person(d: ImageDraw.ImageDraw, rng, cx: float, feet_y: float, height: float,
            portrait: bool = False) -> None:
    """A simple human figure: legs, torso, arms, neck, head with hair and face."""
    skin = _col(rng, SKIN[int(rng.integers(0, len(SKIN)))], 8)
    hair = _col(rng, HAIR[int(rng.integers(0, len(HAIR)))], 8)
    shade = tuple(int(c * 0.8) for c in skin)
    bare_torso = rng.random() < 0.35
    shirt = skin if bare_torso else _col(rng, rng.uniform(20, 235, 3), 5)
    pants = _col(rng, PANTS[int(rng.integers(0, 4))], 10)
    shorts = rng.random() < 0.4
    long_hair = rng.random() < 0.45
    hh = height / 7.5  # head height
    hw = hh * 0.78
    top = feet_y - height
    head_c = (cx, top + hh / 2)
    shoulder_y = top + hh * 1.35
    hip_y = top + hh * 3.9
    sw = hh * (1.9 if not long_hair else 1.6)  # shoulder width
    if not portrait:
        leg_w = max(2, int(hh * 0.42))
        spread = hh * rng.uniform(0.15, 0.6)
        for side in (-1, 1):
            kx = cx + side * hh * 0.35
            fx = kx + side * spread
            d.line([(kx, hip_y), (fx, feet_y - hh * 0.1)], fill=pants, width=leg_w)
            if shorts:
                d.line([(kx + (fx - kx) * 0.45, hip_y + (feet_y - hip_y) * 0.45), (fx, feet_y - hh * 0.1)],
                       fill=skin, width=int(leg_w * 0.8))
            barefoot = rng.random() < 0.4
            d.ellipse([fx - hh * 0.3 + side * hh * 0.1, feet_y - hh * 0.2,
                       fx + hh * 0.3 + side * hh * 0.1, feet_y],
                      fill=skin if barefoot else (35, 30, 30))
        if bare_torso and rng.random() < 0.5:  # swimwear
            d.rectangle([cx - sw * 0.38, hip_y - hh * 0.35, cx + sw * 0.38, hip_y + hh * 0.3],
                        fill=_col(rng, rng.uniform(0, 255, 3), 5))
    # torso (slightly tapered)
    d.polygon([(cx - sw / 2, shoulder_y), (cx + sw / 2, shoulder_y), (cx + sw * 0.4, hip_y),
               (cx - sw * 0.4, hip_y)], fill=shirt)
    d.ellipse([cx - sw / 2 - hh * 0.15, shoulder_y - hh * 0.15, cx - sw / 2 + hh * 0.45,
               shoulder_y + hh * 0.45], fill=shirt)
    d.ellipse([cx + sw / 2 - hh * 0.45, shoulder_y - hh * 0.15, cx + sw / 2 + hh * 0.15,
               shoulder_y + hh * 0.45], fill=shirt)
    if bare_torso:  # chest / navel shading
        d.arc([cx - sw * 0.4, shoulder_y + hh * 0.4, cx - sw * 0.02, shoulder_y + hh * 1.2],
              20, 160, fill=shade, width=max(1, int(hh * 0.05)))
        d.arc([cx + sw * 0.02, shoulder_y + hh * 0.4, cx + sw * 0.4, shoulder_y + hh * 1.2],
              20, 160, fill=shade, width=max(1, int(hh * 0.05)))
        d.ellipse([cx - hh * 0.05, hip_y - hh * 0.6, cx + hh * 0.05, hip_y - hh * 0.48], fill=shade)
    # arms
    arm_w = max(2, int(hh * 0.3))
    for side in (-1, 1):
        sx = cx + side * sw / 2
        ang = rng.uniform(0.05, 0.8)
        ex = sx + side * np.sin(ang) * hh * 1.4
        ey = shoulder_y + np.cos(ang) * hh * 1.4
        hx = ex + side * rng.uniform(-0.3, 0.9) * hh
        hy = ey + hh * rng.uniform(0.6, 1.3)
        sleeve = skin if bare_torso or rng.random() < 0.4 else shirt
        d.line([(sx, shoulder_y + hh * 0.1), (ex, ey)], fill=sleeve, width=arm_w)
        d.line([(ex, ey), (hx, hy)], fill=skin, width=int(arm_w * 0.85))
        d.ellipse([hx - arm_w * 0.6, hy - arm_w * 0.6, hx + arm_w * 0.6, hy + arm_w * 0.6], fill=skin)
    # neck, hair behind, head
    d.rectangle([cx - hw * 0.22, head_c[1] + hh * 0.3, cx + hw * 0.22, shoulder_y + hh * 0.1], fill=shade)
    if long_hair:
        d.rounded_rectangle([cx - hw * 0.62, head_c[1] - hh * 0.5, cx + hw * 0.62, head_c[1] + hh * 1.1],
                            radius=int(hw * 0.5), fill=hair)
    d.ellipse([cx - hw / 2, head_c[1] - hh / 2, cx + hw / 2, head_c[1] + hh / 2], fill=skin)
    d.ellipse([cx - hw * 0.58, head_c[1] - hh * 0.05, cx - hw * 0.42, head_c[1] + hh * 0.18], fill=skin)
    d.ellipse([cx + hw * 0.42, head_c[1] - hh * 0.05, cx + hw * 0.58, head_c[1] + hh * 0.18], fill=skin)
    d.chord([cx - hw * 0.53, head_c[1] - hh * 0.56, cx + hw * 0.53, head_c[1] + hh * 0.1],
            180, 360, fill=hair)
    # face
    ey_ = head_c[1] + hh * 0.02
    for side in (-1, 1):
        ex = cx + side * hw * 0.2
        r = hw * 0.09
        d.ellipse([ex - r * 1.3, ey_ - r * 0.7, ex + r * 1.3, ey_ + r * 0.7], fill=(240, 240, 235))
        d.ellipse([ex - r * 0.6, ey_ - r * 0.6, ex + r * 0.6, ey_ + r * 0.6],
                  fill=_col(rng, (60, 45, 30), 15))
        d.line([(ex - r * 1.5, ey_ - r * 2.0), (ex + r * 1.5, ey_ - r * 2.2)],
               fill=hair, width=max(1, int(r * 0.6)))
    d.line([(cx, ey_ + hh * 0.05), (cx - hw * 0.04, ey_ + hh * 0.2)],
           fill=shade, width=max(1, int(hh * 0.03)))
    lips = _col(rng, (np.array(skin) * 0.75 + np.array((180, 60, 60)) * 0.25), 5)
    d.ellipse([cx - hw * 0.16, ey_ + hh * 0.26, cx + hw * 0.16, ey_ + hh * 0.33], fill=lips)


def _blobs(img: Image.Image, rng, n: int) -> Image.Image:
    """Soft-edged ellipses (balls, bushes, rocks, bokeh) blended in with blurred masks."""
    w, h = img.size
    for _ in range(n):
        mask = Image.new("L", (w, h), 0)
        md = ImageDraw.Draw(mask)
        rx, ry = w * rng.uniform(0.02, 0.15), h * rng.uniform(0.02, 0.15)
        x, y = w * rng.random(), h * rng.uniform(0.2, 1.0)
        md.ellipse([x - rx, y - ry, x + rx, y + ry], fill=int(rng.integers(120, 256)))
        mask = mask.filter(ImageFilter.GaussianBlur(float(rng.uniform(1, max(rx, ry) * 0.3))))
        colour = SKIN[int(rng.integers(0, len(SKIN)))] if rng.random() < 0.3 else rng.uniform(0, 255, 3)
        img = Image.composite(Image.new("RGB", (w, h), _col(rng, colour, 10)), img, mask)
    return img


def _camera(rng, a: np.ndarray) -> np.ndarray:
    h, w = a.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    xx, yy = xx / w - 0.5, yy / h - 0.5
    ang = rng.uniform(0, 2 * np.pi)
    light = 1 + rng.uniform(0, 0.35) * (np.cos(ang) * xx + np.sin(ang) * yy)
    vignette = 1 - rng.uniform(0, 0.5) * (xx ** 2 + yy ** 2)
    a = a * (light * vignette)[..., None] * rng.uniform(0.7, 1.15)
    a *= np.float32(rng.uniform(0.9, 1.1, 3))  # white balance
    a = 255 * (np.clip(a, 0, 255) / 255) ** np.float32(rng.uniform(0.8, 1.25))
    a += rng.normal(0, rng.uniform(1, 5), a.shape).astype(np.float32)
    return np.clip(a + 0.5, 0, 255).astype(np.uint8)


def photo(rng: np.random.Generator, w: int | None = None, h: int | None = None,
          people: int | None = None) -> np.ndarray:
    """An RGB uint8 photo-like image (H, W, 3). Size and number of people drawn from ``rng``."""
    if w is None or h is None:
        aspect = [(4, 3), (3, 4), (16, 9), (9, 16), (1, 1), (3, 2), (2, 3)][int(rng.integers(0, 7))]
        long_side = int(rng.integers(320, 800))
        s = long_side / max(aspect)
        w, h = int(aspect[0] * s), int(aspect[1] * s)
    kind = rng.random()
    portrait = kind < 0.25
    if kind < 0.6:
        base, ground_y = _outdoor(rng, h, w)
    else:
        base, ground_y = _indoor(rng, h, w)
    img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    img = _blobs(img, rng, int(rng.integers(0, 5)))
    if people is None:
        people = 0 if rng.random() < 0.3 else int(rng.integers(1, 4))
    d = ImageDraw.Draw(img)
    if portrait and people:
        ph = h * rng.uniform(1.8, 3.2)  # body much taller than the frame: head and shoulders fill it
        _person(d, rng, w * rng.uniform(0.35, 0.65), h * rng.uniform(0.1, 0.25) + ph, ph, portrait=True)
    else:
        for _ in range(people):
            ph = h * rng.uniform(0.35, 0.9)
            feet = min(h - 2, ground_y + (h - ground_y) * rng.uniform(0.1, 0.9))
            _person(d, rng, w * rng.uniform(0.15, 0.85), feet, ph)
    if rng.random() < 0.7:
        img = img.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.4, 1.5))))
    out = _camera(rng, np.asarray(img, dtype=np.float32))
    buf = io.BytesIO()
    Image.fromarray(out).save(buf, format="JPEG", quality=int(rng.integers(55, 95)))
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
