#!/usr/bin/env python3
"""Independent synthetic chest X-ray corpus in the public MIMIC-CXR layout.

Written without reference to medfuse's own generator, so that a model tuned on that corpus can be
tested on data it was not tuned on. Anatomy is built as water / bone / metal thickness maps in
millimetres, projected through an exponential attenuation model with scatter, correlated quantum
noise and a per-image processing and tone curve. Reports come from their own phrase banks and
layouts; the CheXpert-style labels are read off the same mention states that wrote the text.
See benchmarks/INDEP_CORPUS.md.

    python benchmarks/indep_corpus.py --studies 200 --seed 1 --out /tmp/indep [--size 2048]
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import re
import sys
import textwrap
import time
from collections import Counter
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import pandas as pd
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from scipy import ndimage

LABELS = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Enlarged Cardiomediastinum", "Fracture",
          "Lung Lesion", "Lung Opacity", "No Finding", "Pleural Effusion", "Pleural Other", "Pneumonia",
          "Pneumothorax", "Support Devices")
PATHOLOGY = tuple(n for n in LABELS if n not in ("No Finding", "Support Devices"))
F32 = np.float32
SIDE = {-1: "right", 1: "left"}   # image left (x < 0) is the patient's right
DX_SOP, CR_SOP = "1.2.840.10008.5.1.4.1.1.1.1", "1.2.840.10008.5.1.4.1.1.1"


# ----------------------------------------------------------------------------- numeric helpers
def _sig(z):
    return (0.5 + 0.5 * np.tanh(0.5 * np.asarray(z, F32))).astype(F32, copy=False)


def _cap(z):
    """Chord profile of a rod or sphere: sqrt(1 - z^2) inside |z| < 1."""
    return np.sqrt(np.clip(1 - z * z, 0, None))


def _side(rng):
    return -1 if rng.random() < 0.5 else 1


def _resize(a, shape):
    return ndimage.zoom(a, (shape[0] / a.shape[0], shape[1] / a.shape[1]), order=1, mode="nearest")[
        :shape[0], :shape[1]]


def _blur(x, sigma_px):
    """Gaussian blur; a large sigma runs on a downsampled copy (scatter, low-pass processing)."""
    if sigma_px < 5:
        return ndimage.gaussian_filter(x, sigma_px, mode="nearest")
    f = int(sigma_px // 2.5)
    return _resize(ndimage.gaussian_filter(x[::f, ::f], sigma_px / f, mode="nearest"), x.shape)


def _noise(rng, shape, sigma_px, aniso=(1.0, 1.0)):
    """Unit-variance band-limited noise, generated coarse and upsampled (fast at 2048 px)."""
    f = max(1, int(sigma_px / 2))
    small = rng.standard_normal((shape[0] // f + 3, shape[1] // f + 3)).astype(F32)
    small = ndimage.gaussian_filter(small, (sigma_px * aniso[0] / f, sigma_px * aniso[1] / f), mode="wrap")
    out = _resize(small, shape) if f > 1 else small[:shape[0], :shape[1]]
    return out / (out[::3, ::3].std() + 1e-6)


def _curve(ctrl):
    """Smooth polyline through the end points (Chaikin corner cutting: no overshoot)."""
    c = np.asarray(ctrl, float)
    for _ in range(3):
        q = np.empty((2 * len(c) - 2, 2))
        q[0::2], q[1::2] = 0.75 * c[:-1] + 0.25 * c[1:], 0.25 * c[:-1] + 0.75 * c[1:]
        c = np.vstack([c[:1], q, c[-1:]])
    return c


class Frame:
    """Pixel grid <-> a tilted patient frame in mm (x to image right, y down, origin midline at the apices)."""

    def __init__(self, H, W, ps, r0, c0, theta):
        self.H, self.W, self.ps, self.r0, self.c0 = H, W, ps, r0, c0
        self.ct, self.st = math.cos(theta), math.sin(theta)

    def grid(self, box=None):
        """(slices, x, y) over the whole image, or over the pixels covering a patient-frame box."""
        rs, cs = slice(0, self.H), slice(0, self.W)
        if box is not None:
            xs, ys = np.array(box[:2])[[0, 1, 0, 1]], np.array(box[2:])[[0, 0, 1, 1]]
            cc = self.c0 + (self.ct * xs - self.st * ys) / self.ps
            rr = self.r0 + (self.st * xs + self.ct * ys) / self.ps
            rs = slice(max(0, int(rr.min()) - 1), min(self.H, int(rr.max()) + 2))
            cs = slice(max(0, int(cc.min()) - 1), min(self.W, int(cc.max()) + 2))
            if rs.start >= rs.stop or cs.start >= cs.stop:
                return None
        X = ((np.arange(cs.start, cs.stop, dtype=F32) - self.c0) * self.ps)[None, :]
        Y = ((np.arange(rs.start, rs.stop, dtype=F32) - self.r0) * self.ps)[:, None]
        return (rs, cs), self.ct * X + self.st * Y, -self.st * X + self.ct * Y


def _tube(fr, layer, pts, radius, amp, profile="rod", gaps=()):
    """Max-accumulate a tube along a polyline (mm). Thin tubes keep their integral (partial volume)."""
    re_ = max(radius, 0.6 * fr.ps)
    amp = amp * radius / re_
    pts = np.asarray(pts, F32)
    for (ax, ay), (bx, by) in zip(pts[:-1], pts[1:]):
        pad = re_ + 2 * fr.ps
        g = fr.grid((min(ax, bx) - pad, max(ax, bx) + pad, min(ay, by) - pad, max(ay, by) + pad))
        if g is None:
            continue
        sl, x, y = g
        dx, dy = bx - ax, by - ay
        t = np.clip(((x - ax) * dx + (y - ay) * dy) / (dx * dx + dy * dy + 1e-6), 0, 1)
        d = np.hypot(x - ax - t * dx, y - ay - t * dy) / re_
        if profile == "rod":
            v = _cap(d)
        elif profile == "wall":   # hollow catheter: bright rims
            v = np.exp(-((d - 0.85) / 0.18) ** 2)
        else:
            v = _sig((1 - d) * re_ / (0.4 * fr.ps))
        for gx, gy, gr in gaps:
            v = v * _sig((np.hypot(x - gx, y - gy) - gr) / (0.4 * fr.ps))
        layer[sl] = np.maximum(layer[sl], amp * v)


# ----------------------------------------------------------------------------- patients and studies
def _patient(rng):
    sex, age = ("F" if rng.random() < 0.48 else "M"), int(np.clip(rng.normal(62, 17), 19, 96))
    hab = str(rng.choice(["thin", "average", "broad", "obese"], p=[0.18, 0.45, 0.2, 0.17]))
    p = {"sex": sex, "age": age, "habitus": hab, "hf": bool(rng.random() < 0.08 + 0.004 * max(0, age - 50)),
         "ctr0": float(0.445 + 0.0012 * (age - 60) + rng.normal(0, 0.035)), "copd": bool(rng.random() < 0.1),
         "sternotomy": bool(rng.random() < 0.02 + 0.002 * max(0, age - 55)), "pacer": bool(rng.random() < 0.045),
         "plaques": bool(rng.random() < 0.015), "nodule": None, "healed_fx": None}
    if rng.random() < 0.025:   # stable findings: the same on every study of this patient
        p["nodule"] = {"side": _side(rng), "t": float(rng.uniform(0.15, 0.8)), "q": float(rng.uniform(0.3, 0.85)),
                       "d": float(rng.uniform(5, 18)), "kind": "nodule"}
    if rng.random() < 0.03:
        p["healed_fx"] = {"side": _side(rng), "rib": int(rng.integers(4, 10)), "q": float(rng.uniform(0.55, 0.9)),
                          "healed": True, "sev": float(rng.uniform(0, 1))}
    return p


def _sample_study(rng, pat):
    """Acquisition setting, the findings present (with sizes) and their mention states (labels)."""
    icu = bool(rng.random() < 0.3)
    S = {"icu": icu, "portable": icu or bool(rng.random() < 0.08)}
    S["supine"] = S["portable"] and bool(rng.random() < 0.4)
    hf = bool((pat["hf"] and rng.random() < 0.65) or rng.random() < 0.035)
    sev = lambda: float(rng.beta(1.1, 2.4))  # noqa: E731 - many small findings, some large
    uni = lambda a, b: float(rng.uniform(a, b))  # noqa: E731
    F = {"ctr": float(np.clip(pat["ctr0"] + 0.05 * hf + 0.025 * S["portable"] + rng.normal(0, 0.012), 0.36, 0.74))}
    if rng.random() < 0.04 + 0.03 * S["portable"]:
        F["mediastinum"] = {"sev": sev()}
    if rng.random() < 0.1 + 0.4 * hf + 0.1 * icu:
        sides = [[-1], [1], [-1, 1]][int(rng.choice(3, p=[0.35, 0.25, 0.4]))]
        F["effusion"] = {"sev": sev(), "sides": sides, "asym": uni(0.4, 1.0)}
    if rng.random() < 0.02 + 0.55 * hf:
        F["edema"] = {"sev": sev()}
    if rng.random() < 0.07 + 0.05 * icu:
        kind = str(rng.choice(["RUL", "RML", "RLL", "LUL", "LLL", "patchy"], p=[.14, .12, .22, .1, .2, .22]))
        F["consolidation"] = {"sev": sev(), "kind": kind, "side": {"R": -1, "L": 1}.get(kind[0]) or _side(rng)}
    elif rng.random() < 0.05:   # an opacity reported without a diagnosis (or as atelectasis vs pneumonia)
        F["opacity"] = {"sev": sev(), "side": _side(rng), "t": uni(0.45, 0.9), "atx_or_pna": bool(rng.random() < 0.45)}
    if rng.random() < 0.1 + 0.12 * icu:
        kind = str(rng.choice(["plate", "basilar", "LLL", "RUL"], p=[0.35, 0.45, 0.13, 0.07]))
        F["atelectasis"] = {"sev": sev(), "kind": kind, "side": _side(rng), "bilateral": bool(rng.random() < 0.4)}
    les = [dict(pat["nodule"])] if pat["nodule"] else []
    if rng.random() < 0.03:
        kind = str(rng.choice(["nodule", "mass", "multiple"], p=[0.55, 0.3, 0.15]))
        for _ in range(int(rng.integers(3, 7)) if kind == "multiple" else 1):
            d = uni(32, 70) if kind == "mass" else float(np.exp(rng.uniform(np.log(5), np.log(30))))
            les.append({"side": _side(rng), "t": uni(0.12, 0.85), "q": uni(0.25, 0.85), "d": d, "kind": kind,
                        "spic": bool(kind == "mass" and rng.random() < 0.5)})
    if les:
        F["lesion"] = les
    if rng.random() < 0.02 + 0.05 * icu:
        F["pneumothorax"] = {"sev": sev(), "side": _side(rng)}
    dev = []
    if icu:
        dev += ["ett"] * (rng.random() < 0.45)
        dev += ["ng"] * (rng.random() < (0.75 if dev else 0.2))
        dev += [str(rng.choice(["rij", "lsc", "lij"]))] if rng.random() < 0.45 else ["picc"] * (rng.random() < 0.2)
        big = "pneumothorax" in F or F.get("effusion", {}).get("sev", 0) > 0.45
        dev += ["chest_tube"] * bool(big and rng.random() < 0.4)
    elif rng.random() < 0.04:
        dev.append("picc")
    F["devices"] = dev + ["pacer"] * pat["pacer"] + ["sternal"] * pat["sternotomy"]
    if pat["healed_fx"] or rng.random() < 0.012:
        F["fracture"] = pat["healed_fx"] or {"side": _side(rng), "rib": int(rng.integers(4, 10)), "q": uni(0.55, 0.9),
                                             "healed": False, "sev": uni(0, 1)}
    if pat["plaques"] or rng.random() < 0.008:
        F["pleural_other"] = {"kind": "plaques" if pat["plaques"] else "thickening", "side": _side(rng),
                              "sev": uni(0.2, 1)}
    S["F"], S["M"] = F, _mention_states(rng, F)
    return S


def _mention_states(rng, F):
    """Per label: 1 asserted, -1 hedged, 0 negated, None not mentioned. Hedged findings are drawn, but subtle."""
    def st(key, p_neg, sub=0.16, p_hedge=0.55):
        if key in F:
            return -1.0 if (F[key]["sev"] < sub and rng.random() < p_hedge) else 1.0
        return 0.0 if rng.random() < p_neg else None
    M = {"Pleural Effusion": st("effusion", 0.55), "Pneumothorax": st("pneumothorax", 0.5),
         "Consolidation": st("consolidation", 0.4), "Edema": st("edema", 0.3), "Atelectasis": st("atelectasis", 0.04),
         "Enlarged Cardiomediastinum": st("mediastinum", 0.2, sub=0.2), "Fracture": st("fracture", 0.12, 0.2, 0.4),
         "Pleural Other": st("pleural_other", 0.0, sub=0.3, p_hedge=0.4)}
    if "lesion" in F:
        M["Lung Lesion"] = -1.0 if max(x["d"] for x in F["lesion"]) < 8 and rng.random() < 0.5 else 1.0
    else:
        M["Lung Lesion"] = 0.0 if rng.random() < 0.08 else None
    ctr = F["ctr"]   # the drawn cardiothoracic ratio decides the label
    if ctr >= 0.53:
        M["Cardiomegaly"] = 1.0
    elif ctr >= 0.50:
        M["Cardiomegaly"] = [-1.0, 1.0, None][int(rng.choice(3, p=[0.6, 0.2, 0.2]))]
    else:
        M["Cardiomegaly"] = 0.0 if rng.random() < 0.55 else None
    if "consolidation" in F:
        M["Pneumonia"] = [1.0, -1.0, None][int(rng.choice(3, p=[0.45, 0.35, 0.2]))]
    elif "opacity" in F and F["opacity"]["atx_or_pna"]:
        M["Pneumonia"], M["Atelectasis"] = -1.0, M["Atelectasis"] if "atelectasis" in F else -1.0
    elif "opacity" not in F and rng.random() < 0.04:
        M["Pneumonia"] = -1.0   # "early pneumonia cannot be excluded", no opacity drawn
    else:
        M["Pneumonia"] = 0.0 if rng.random() < 0.1 else None
    M["Support Devices"] = 1.0 if F["devices"] else None
    parenchymal = any(k in F for k in ("consolidation", "edema", "atelectasis", "lesion", "opacity"))
    M["Lung Opacity"] = 1.0 if parenchymal else (0.0 if rng.random() < 0.4 else None)   # refined by the text
    M["No Finding"] = None if any(M.get(k) in (1.0, -1.0) for k in PATHOLOGY) else 1.0
    return M


# ----------------------------------------------------------------------------- frontal anatomy
def _geometry(rng, pat, S, H, W):
    F, hab = S["F"], pat["habitus"]
    Wt = {"thin": 136, "average": 148, "broad": 160, "obese": 156}[hab] * (0.93 if pat["sex"] == "F" else 1.0)
    Wt *= rng.uniform(0.93, 1.07)
    Hd = Wt * rng.uniform(1.6, 1.9) * (1.1 if pat["copd"] else 1.0) * (0.88 if S["portable"] else 1.0)
    G = {"Wt": Wt, "fat": {"thin": 6, "average": 20, "broad": 28, "obese": 58}[hab] * rng.uniform(0.7, 1.3),
         "T0": {"thin": 185, "average": 215, "broad": 235, "obese": 285}[hab] * rng.uniform(0.92, 1.08),
         "m0": 10.0, "xm": 0.0, "tr_dx": rng.normal(0, 2), "xs": rng.normal(0, 3 if not S["portable"] else 7),
         "Wl": {s: Wt - 9 + rng.normal(0, 3) for s in (-1, 1)}}
    G["apex"] = {s: 0.42 * G["Wl"][s] for s in (-1, 1)}
    dome = rng.uniform(0.09, 0.16) * Hd * (0.5 if pat["copd"] else 1.0)
    G["dome"], G["Hd"] = {-1: dome, 1: dome * rng.uniform(0.85, 1.05)}, {-1: Hd, 1: Hd + rng.uniform(5, 22)}
    G["D"] = G["T0"] * rng.uniform(0.55, 0.68)
    G["knob"], G["Mr"], G["Ml"] = rng.uniform(6, 14), rng.uniform(20, 28), rng.uniform(22, 30)
    if "mediastinum" in F:
        f = 1.25 + 0.6 * F["mediastinum"]["sev"]
        G["Mr"], G["Ml"], G["knob"] = G["Mr"] * f, G["Ml"] * f, G["knob"] * (1 + 0.8 * F["mediastinum"]["sev"])
    at = F.get("atelectasis")
    if at and at["kind"] in ("LLL", "RUL"):   # volume loss: elevated hemidiaphragm, shift towards the collapse
        s = 1 if at["kind"] == "LLL" else -1
        G["Hd"][s] -= 8 + 22 * at["sev"]
        G["xm"] += s * (3 + 8 * at["sev"])
        G["tr_dx"] += s * (2 + 6 * at["sev"]) * (at["kind"] == "RUL")
    side_m = rng.uniform(-0.6, 1.2) * G["fat"] + rng.uniform(10, 60)   # field of view: thorax plus random margins
    top, bot = rng.uniform(45, 110), rng.uniform(30, 110)
    need_w, need_h = 2 * (Wt + side_m), Hd + 20 + top + bot
    ps = max(need_w / W, need_h / H) * rng.uniform(1.0, 1.1)
    r0 = (H - need_h / ps) * rng.uniform(0.2, 0.8) + top / ps
    tilt = math.radians(rng.normal(0, 2.0 if not S["portable"] else 4.5))
    return G, Frame(H, W, ps, r0, W / 2 + rng.normal(0, 0.03) * W, tilt)


def _lung(G, s, x, y):
    """Inside-distance (mm) of lung s (-1 right, +1 left), diaphragm height, lateral coordinate, height fraction,
    lateral border and the distance from the chest wall / apex only."""
    u = s * (x - G["xm"])
    Hd, Wl, ac, m0 = G["Hd"][s], G["Wl"][s], G["apex"][s], G["m0"]
    t = np.clip(y / Hd, 0, 1.3)
    dome_t = np.sqrt(np.clip(1 - (1 - np.clip(t / 0.09, 0, 1)) ** 2, 0, 1))
    lat = ac + (Wl - ac) * dome_t * (0.3 + 0.7 * (1 - (1 - np.clip(t / 0.9, 0, 1)) ** 2.3))
    med = m0 + (ac - m0) * (1 - np.sqrt(np.clip(1 - (1 - np.clip(t / 0.16, 0, 1)) ** 2, 0, 1)))
    q = np.clip((u - m0) / (Wl - m0), 0, 1)
    yd = Hd - G["dome"][s] * (0.85 * np.sin(np.pi * q ** 0.85) + 0.3 * (1 - q))
    dside = np.minimum(np.minimum(lat - u, u - med), y)
    return np.minimum(dside, yd - y), yd, u, t, lat, dside


def _lung_point(G, s, t, q):
    """Patient-frame point at height fraction t and lateral fraction q of lung s."""
    y, us = t * G["Hd"][s], np.linspace(0, G["Wl"][s], 200)
    inside = us[_lung(G, s, G["xm"] + s * us, np.full_like(us, y))[0] > 2]
    u = inside[0] + q * (inside[-1] - inside[0]) if inside.size else G["apex"][s]
    return G["xm"] + s * u, y


def _heart(rng, G, F):
    """A lobulated, tilted cardiac outline scaled to the study's cardiothoracic ratio."""
    h = {"tilt": rng.uniform(0.55, 0.95), "a2": rng.uniform(-0.06, 0.06), "a3": rng.uniform(0, 0.06),
         "ph": rng.uniform(0, 2 * np.pi), "rb": rng.uniform(0.68, 0.82)}
    target, psi = F["ctr"] * (G["Wl"][-1] + G["Wl"][1]), np.linspace(0, 2 * np.pi, 360)
    k = 1 + h["a2"] * np.cos(2 * psi + h["ph"]) + h["a3"] * np.cos(3 * psi)
    a, b = np.cos(psi) * k, h["rb"] * np.sin(psi) * k
    c, s = math.cos(h["tilt"]), math.sin(h["tilt"])
    px, py = c * a - s * b, s * a + c * b
    h["scale"] = target / (px.max() - px.min())   # the outline scales linearly
    px, py = px * h["scale"], py * h["scale"]
    h["xh"] = G["xm"] - target * rng.uniform(0.33, 0.41) - px.min()
    h["yh"] = G["Hd"][1] - 0.3 * G["dome"][1] + 12 - py.max()
    h["top"] = float(h["yh"] + py.min())
    return h


def _heart_mask(h, x, y, edge):
    c, s = math.cos(h["tilt"]), math.sin(h["tilt"])
    dx, dy = x - h["xh"], y - h["yh"]
    a, b = (c * dx + s * dy) / h["scale"], (-s * dx + c * dy) / (h["scale"] * h["rb"])
    psi = np.arctan2(b, a)
    k = 1 + h["a2"] * np.cos(2 * psi + h["ph"]) + h["a3"] * np.cos(3 * psi)
    return _sig((1 - np.hypot(a, b) / k) * h["scale"] * 0.8 / edge)


def _vessels(rng, fr, G, layer, s, ceph):
    """Branching pulmonary vessels from the hilum, tapering to the periphery."""
    hx, hy = G["xm"] + s * (G["Mr" if s < 0 else "Ml"] + 14), 0.43 * G["Hd"][s]
    ang = (0.0 if s > 0 else np.pi) + s * (np.radians([-75, -45, -15, 15, 45, 75]) + rng.normal(0, 0.12, 6))
    x0, y0, L, r = np.full(6, hx), np.full(6, hy), rng.uniform(30, 45, 6), rng.uniform(3.5, 5.0, 6)
    for _ in range(5 if fr.ps < 0.6 else 4):   # one vectorised lung test per generation
        x1, y1 = x0 + L * np.cos(ang), y0 + L * np.sin(ang)
        keep = _lung(G, s, x1, y1)[0] > -4
        x0, y0, x1, y1, ang, L, r = (v[keep] for v in (x0, y0, x1, y1, ang, L, r))
        for a, b, c, d, rr in zip(x0, y0, x1, y1, r * (1 + ceph * (y1 < 0.42 * G["Hd"][s]))):
            _tube(fr, layer, [(a, b), (c, d)], rr, 3.5 * rr)
        n = len(x1)
        x0, y0 = np.repeat(x1, 2), np.repeat(y1, 2)
        ang = np.repeat(ang, 2) + np.tile([-1, 1], n) * rng.uniform(0.25, 0.6, 2 * n)
        L, r = np.repeat(L, 2) * rng.uniform(0.62, 0.82, 2 * n), np.repeat(r, 2) * rng.uniform(0.64, 0.76, 2 * n)


def _ribs(rng, fr, G, B, fx):
    """Posterior ribs (arching up, then down laterally) and fainter anterior ribs; an optional rib fracture."""
    sp, y1 = G["Hd"][-1] / rng.uniform(9.2, 10.6), -rng.uniform(8, 18)
    for s in (-1, 1):
        L = G["Wl"][s] + 10
        for k in range(11):
            y0 = y1 + k * sp + (s > 0) * 2.0
            rise, drop, w = L * rng.uniform(0.05, 0.1), L * rng.uniform(0.3, 0.42) * (1 + 0.03 * k), 7.5 + 0.35 * k
            g = fr.grid((G["xs"] - L - 10, G["xs"] + L + 10, y0 - rise - w, y0 + drop + w + 0.6 * L))
            if g is None:
                continue
            sl, x, y = g
            up = s * (x - G["xs"])
            q = np.clip(up / L, 0, 1.1)
            path = y0 - rise * (1 - (1 - np.clip(q / 0.4, 0, 1)) ** 2) + drop * np.clip((q - 0.4) / 0.6, 0, None) ** 2
            slope = np.abs(np.gradient(path, axis=1) / fr.ps) if path.shape[1] > 1 else 0
            hit = fx is not None and fx["side"] == s and fx["rib"] == k
            step = (0 if fx["healed"] else 1.5 + 3 * fx["sev"]) * (q > fx["q"]) if hit else 0.0
            d = np.abs(y - path - step) / (0.5 * w) / np.sqrt(1 + slope ** 2)
            val = (0.55 * _cap(d) + 0.45 * np.exp(-((d - 0.9) / 0.14) ** 2)) * (up > 12) * _sig((L + 4 - up) / 3)
            if hit and fx["healed"]:   # callus
                val = val + 0.7 * np.exp(-((q - fx["q"]) / 0.04) ** 2) * np.exp(-(d / 1.6) ** 2)
            elif hit:   # cortical gap with a step-off
                val = val * (1 - np.exp(-((q - fx["q"]) / (0.006 + 0.008 * fx["sev"])) ** 2))
            da = np.abs(y - (y0 - rise + drop + rng.uniform(0.35, 0.5) * (L - up))) / (0.5 * (w + 4))
            ant = 0.5 * _cap(da) * _sig((up - 0.35 * L) / 6) * _sig((L - up) / 4)
            B[sl] += 5.5 * val + 3.0 * ant


def _frontal(rng, pat, S, H, W):
    F = S["F"]
    G, fr = _geometry(rng, pat, S, H, W)
    h, (_, x, y), ps = _heart(rng, G, F), fr.grid(), fr.ps
    Wm, B, Mm, Ves, air, fill, extra, ptx = (np.zeros((H, W), F32) for _ in range(8))
    Wt, fat, xm = G["Wt"], G["fat"], G["xm"]
    # body soft tissue with neck, shoulders and an abdominal continuation
    bw = 55 + 0.4 * fat + (Wt + 0.6 * fat - 15) * _sig((y + 50) / 12) - 34 * _sig((y - 60) / 25)
    rel = np.abs(x - xm * 0.5) / bw
    Wm += G["T0"] * _cap(rel ** 1.2) * (0.6 + 0.4 * _sig((y + 40) / 18)) * _sig((1 - rel) * bw / 2)
    if pat["sex"] == "F" and rng.random() < 0.8:   # breast shadows over the lower zones
        R = rng.uniform(50, 80) * (1.35 if pat["habitus"] == "obese" else 1)
        for s in (-1, 1):
            cx, cy = xm + s * 0.58 * Wt, 0.8 * G["Hd"][s]
            Wm += rng.uniform(20, 45) * _cap(np.hypot((x - cx) / R, (y - cy) / (0.85 * R))) * _sig((y - cy) / (0.3 * R))
    lungm = {}
    for s in (-1, 1):   # lung air: thins towards the chest wall and apex, not towards the dome
        d, yd, u, t, lat, dside = _lung(G, s, x, y)
        inn = _sig(d / 1.3)
        below = np.clip(y - yd, 0, None)
        rec = 0.15 * G["D"] * np.exp(-below / 15) * _sig((lat - u) / 3) * _sig((u - G["m0"]) / 3) * _sig(
            (y - yd) / 1.3)   # the posterior recess behind the dome
        air += inn * G["D"] * (0.45 + 0.55 * t) * (0.3 + 0.7 * (1 - np.exp(-np.maximum(dside, 0) / 22))) + rec * (
            below < 80)
        lungm[s] = (d, yd, u, t, inn)
    med_l = G["Ml"] + G["knob"] * np.exp(-((y - 0.22 * G["Hd"][1]) / 16) ** 2) + 8 * np.exp(
        -((y - 0.36 * G["Hd"][1]) / 14) ** 2)
    mm = _sig((G["Mr"] + (x - xm)) / 1.4) * _sig((med_l - (x - xm)) / 1.4) * _sig((h["top"] + 25 - y) / 5)
    air *= (1 - 0.82 * _heart_mask(h, x, y, 1.2)) * (1 - mm)
    _findings(rng, fr, G, F, S, x, y, lungm, fill, extra, ptx, B)
    ceph = 0.6 * F["edema"]["sev"] if "edema" in F else 0.0
    for s in (-1, 1):
        _vessels(rng, fr, G, Ves, s, ceph)
        hx, hy = xm + s * (G["Mr" if s < 0 else "Ml"] + 16), 0.42 * G["Hd"][s]
        rho = np.hypot((x - hx) / rng.uniform(12, 17), (y - hy) / rng.uniform(22, 30))
        extra += rng.uniform(12, 22) * _cap(rho) * (1 + 0.6 * ceph)   # hilar vessels
    if "edema" in F:   # indistinct vessels
        Ves = ndimage.gaussian_filter(Ves, (0.4 + 2.5 * F["edema"]["sev"]) / ps)
    tex = 3.3 * _noise(rng, (H, W), 2.5 / ps) + 1.8 * _noise(rng, (H, W), 0.9 / ps)
    fill = np.clip(fill, 0, 1)
    Wm += -0.75 * air * (1 - fill) - 0.25 * air * ptx + (Ves + tex) * np.clip(air / G["D"], 0, 1) * (1 - ptx) * (
        1 - fill) + extra
    tr, yc, xt = np.zeros_like(Wm), 0.33 * G["Hd"][-1], xm + G["tr_dx"]   # trachea and main bronchi
    _tube(fr, tr, [(xt, -200), (xt, yc - 10), (xt + 0.5, yc)], 8.0, 16.0)
    _tube(fr, tr, [(xt, yc), (xt - 22, yc + 20), (xt - 38, yc + 30)], 6.0, 11.0)
    _tube(fr, tr, [(xt, yc), (xt + 26, yc + 28), (xt + 48, yc + 42)], 5.5, 10.0)
    Wm -= tr * (1 - 0.5 * _sig((y - 10) / 20))
    if rng.random() < 0.75:   # gastric bubble (air-fluid level when upright)
        gx, gy = xm + 0.55 * G["Wl"][1], G["Hd"][1] - 0.4 * G["dome"][1] + rng.uniform(22, 40)
        rho = np.hypot((x - gx) / rng.uniform(25, 45), (y - gy) / rng.uniform(14, 24))
        Wm -= rng.uniform(12, 35) * _cap(rho) * (1 if S["supine"] else _sig((gy + 6 - y) / 1.5))
    spw, per = 28 + 12 * np.clip(y / G["Hd"][-1], 0, 1), G["Hd"][-1] / rng.uniform(10.5, 12)   # spine
    ph = np.mod(y / per + rng.random(), 1.0)
    B += 6 * _sig((spw / 2 - np.abs(x - G["xs"])) / 1.5) * (1 - 0.25 * np.exp(-((ph - 0.5) / 0.07) ** 2))
    ped = np.hypot((np.abs(x - G["xs"]) - (spw / 2 - 5)) / 3.5, (ph - 0.3) * per / 5.0)
    B += 2.5 * _sig((1 - ped) / 0.25) * (np.abs(x - G["xs"]) < spw / 2 + 4)
    _ribs(rng, fr, G, B, F.get("fracture"))
    for s in (-1, 1):   # clavicles, humeral heads, scapulae
        m0x, lat, cy = G["xs"] + s * 22, xm + s * (Wt + 35), rng.uniform(0.03, 0.1) * G["Hd"][s]
        pts = _curve([(m0x, cy + 6), (m0x + s * 40, cy + 4), (lat - s * 55, cy - 14), (lat, cy - 22)])
        _tube(fr, B, pts, rng.uniform(8.0, 10.0), 10.0)
        hx, hy = xm + s * (Wt + 22 + 0.3 * fat), -rng.uniform(5, 25)
        rho = np.hypot(x - hx, y - hy) / rng.uniform(22, 28)
        B += (9 * _cap(rho) + 3 * np.exp(-((rho - 1) / 0.1) ** 2)) * _sig((y - hy) / 6 + 2)
        if S["portable"] or rng.random() < 0.3:
            sx = xm + s * (Wt - rng.uniform(10, 40))
            blade = _sig((s * (x - sx)) / 2) * _sig((0.55 * G["Hd"][s] - y - 0.6 * s * (x - sx)) / 3) * _sig((y + 10) / 4)
            B += 3.0 * blade * _sig((Wt + 40 - s * (x - xm)) / 4)
    _devices(rng, fr, G, F, S, h, Mm, Wm)
    return _expose(rng, fr, Wm, B, Mm, S, pat), fr.ps


def _findings(rng, fr, G, F, S, x, y, lungm, fill, extra, ptx, B):
    """Draw the findings: `fill` is the fraction of lung air replaced, `extra` added tissue (mm of water)."""
    def add(f):
        fill[...] = fill + f * (1 - fill)
    patch = np.clip(0.65 + 0.35 * _noise(rng, x.shape, 5 / fr.ps), 0, 1)
    for i, s in enumerate(F.get("effusion", {}).get("sides", ())):
        e, (d, yd, u, t, inn) = F["effusion"], lungm[s]
        sv = e["sev"] * (e["asym"] if i == 1 else 1.0)
        hgt = G["Hd"][s] * (0.03 + 0.9 * sv)   # fluid height above the costophrenic angle
        q = np.clip((u - G["m0"]) / (G["Wl"][s] - G["m0"]), 0, 1)
        inside = np.clip(inn + _sig((y - yd) / 2) * (np.abs(u - G["Wl"][s] * 0.6) < G["Wl"][s] * 0.45), 0, 1)
        if S["supine"]:   # layering: a graded haze, denser inferiorly
            f = (0.1 + 0.55 * sv) * (0.25 + 0.75 * np.clip(t, 0, 1) ** 1.5) * inside
            add(np.maximum(f, 0.9 * _sig((y - (G["Hd"][s] - 0.3 * hgt)) / 3) * inside))
        else:   # meniscus, higher laterally
            add(0.95 * _sig((y - (G["Hd"][s] - hgt * (0.6 + 0.4 * q ** 1.5))) / (1.5 + 0.05 * hgt)) * inside)
    if "consolidation" in F:
        c = F["consolidation"]
        s, kind = c["side"], c["kind"]
        d, yd, u, t, inn = lungm[s]
        yf = 0.44 * G["Hd"][s] + 0.08 * u   # horizontal fissure
        if kind == "RUL":
            w = _sig((yf - y) / 1.0)
        elif kind == "RML":   # silhouettes the right heart border
            w = _sig((y - yf) / 1.0) * np.exp(-((u - 45) / (35 + 25 * c["sev"])) ** 2) * _sig((yd - 12 - y) / 8)
        elif kind in ("RLL", "LLL"):
            w = _sig((t - (0.72 - 0.25 * c["sev"])) / 0.04)
        elif kind == "LUL":
            w = np.exp(-((t - 0.5) / 0.18) ** 2) * np.exp(-((u - 55) / 45) ** 2)
        else:
            w = np.zeros_like(x)
            for _ in range(int(rng.integers(2, 6))):
                cx, cy = _lung_point(G, s, rng.uniform(0.25, 0.9), rng.uniform(0.15, 0.9))
                r = rng.uniform(8, 20 + 30 * c["sev"])
                w = np.maximum(w, np.exp(-(((x - cx) ** 2 + (y - cy) ** 2) / (r * r)) ** 1.5))
        w = w * inn * (patch if kind == "patchy" else np.clip(0.85 + 0.6 * (patch - 0.65), 0, 1))
        if kind != "patchy" and c["sev"] > 0.4:   # air bronchograms
            br = np.zeros_like(x)
            for _ in range(4):
                x0, y0 = _lung_point(G, s, rng.uniform(0.3, 0.8), 0.1)
                a = (0.0 if s > 0 else np.pi) + rng.normal(0, 0.5)
                _tube(fr, br, [(x0 + k * 12 * math.cos(a + 0.1 * k), y0 + k * 12 * math.sin(a + 0.1 * k))
                               for k in range(6)], 1.8, 1.0)
            w = w * (1 - 0.45 * ndimage.gaussian_filter(br, 0.8 / fr.ps))
        add((0.35 + 0.6 * c["sev"]) * w)
    if "opacity" in F:
        o = F["opacity"]
        cx, cy = _lung_point(G, o["side"], o["t"], rng.uniform(0.3, 0.8))
        r = rng.uniform(12, 30)
        add((0.15 + 0.3 * o["sev"]) * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (r * r)) * patch * lungm[o["side"]][4])
    if "edema" in F:   # perihilar haze -> alveolar "bat wing"; Kerley B lines at the bases
        sv = F["edema"]["sev"]
        for s in (-1, 1):
            d, yd, u, t, inn = lungm[s]
            bat = np.exp(-(((u - G["Mr" if s < 0 else "Ml"] - 10) / (0.55 * G["Wl"][s])) ** 2
                           + ((y - 0.45 * G["Hd"][s]) / (0.33 * G["Hd"][s])) ** 2))
            add(((0.08 + 0.2 * sv) * bat + max(0.0, sv - 0.45) * 1.3 * bat ** 1.5 * patch) * inn)
            for _ in range(int(4 + 22 * sv) if sv > 0.2 else 0):
                yy, ln = rng.uniform(0.62, 0.95) * G["Hd"][s], rng.uniform(8, 20)
                xl = float(_lung(G, s, G["xm"] + s * np.linspace(0, G["Wl"][s], 160), np.full(160, yy))[4].max())
                _tube(fr, extra, [(G["xm"] + s * (xl - 1), yy), (G["xm"] + s * (xl - ln), yy + rng.normal(0, 1.5))],
                      rng.uniform(0.5, 0.8), 5.0, "flat")
    a = F.get("atelectasis")
    for s in ([-1, 1] if a["bilateral"] and a["kind"] in ("plate", "basilar") else [a["side"]]) if a else ():
        d, yd, u, t, inn = lungm[s]
        if a["kind"] == "plate":   # linear / discoid bands at the base
            band = np.zeros_like(x)
            for _ in range(int(rng.integers(1, 3))):
                cx, cy = _lung_point(G, s, rng.uniform(0.68, 0.86), rng.uniform(0.3, 0.7))
                ln, an = rng.uniform(20, 65) / 2, rng.normal(0, 0.2)
                _tube(fr, band, [(cx - ln * math.cos(an), cy - ln * math.sin(an)),
                                 (cx + ln * math.cos(an), cy + ln * math.sin(an))],
                  0.8 + 2 * a["sev"], 0.5 + 0.3 * a["sev"])
            add(ndimage.gaussian_filter(band, 0.8 / fr.ps) * inn)
        elif a["kind"] == "basilar":   # streaky subsegmental
            streak = np.clip(0.55 + 0.45 * _noise(rng, x.shape, 3.5 / fr.ps, aniso=(0.7, 1.8)), 0, 1)
            add((0.25 + 0.5 * a["sev"]) * _sig((y - (yd - 12 - 30 * a["sev"])) / 5) * streak * inn)
        elif a["kind"] == "LLL":   # retrocardiac triangle with a sharp lateral edge
            edge = G["m0"] + 12 + (y - 0.42 * G["Hd"][s]) * (0.35 + 0.35 * a["sev"])
            add(0.85 * _sig((edge - u) / 1.2) * _sig((y - 0.42 * G["Hd"][s]) / 4) * inn)
        else:   # right upper lobe collapse: dense wedge above an elevated fissure
            add(0.85 * _sig((0.4 * G["Hd"][s] - (u - 25) * (0.3 + 0.5 * a["sev"]) - y) / 1.0) * inn)
    for les in F.get("lesion", ()):   # spheres (5-30 mm nodules), lobulated / spiculated masses
        cx, cy = _lung_point(G, les["side"], les["t"], les["q"])
        r, ang = les["d"] / 2, np.arctan2(y - cy, x - cx)
        mod = 1 + (0.12 * np.cos(3 * ang + r) + 0.08 * np.cos(5 * ang)) * (les["kind"] == "mass")
        rho = np.hypot(x - cx, y - cy) / (r * mod)
        extra += 1.6 * r * _cap(rho) * _sig((1 - rho) * r / 0.8)
        for a0 in rng.uniform(0, 2 * np.pi, 10) if les.get("spic") else ():
            ln = r * rng.uniform(1.2, 1.8)
            _tube(fr, extra, [(cx, cy), (cx + ln * math.cos(a0), cy + ln * math.sin(a0))], 0.8, 4.0, "flat")
    if "pneumothorax" in F:   # pleural air along the wall / apex: no markings, visceral pleural line
        p, s = F["pneumothorax"], F["pneumothorax"]["side"]
        d, yd, u, t, inn = lungm[s]
        gap = (3 + 55 * p["sev"]) * np.sqrt(np.clip(1 - t / (0.25 + 0.9 * p["sev"]), 0, 1))
        dout = np.minimum(_lung(G, s, x, y)[4] - u, y)
        region = _sig((gap - dout) / 0.8) * inn * (gap > 0.5)
        ptx += region
        extra += 5.0 * np.exp(-((dout - gap) / 0.7) ** 2) * (gap > 0.5) * inn
        add(0.12 * p["sev"] * inn * (1 - region))
    po = F.get("pleural_other")
    for s in ((-1, 1) if po["kind"] == "plaques" else (po["side"],)) if po else ():
        d, yd, u, t, inn = lungm[s]
        if po["kind"] == "plaques":   # calcified, irregular
            for _ in range(int(rng.integers(2, 5))):
                cx, cy = _lung_point(G, s, rng.uniform(0.35, 0.9), rng.uniform(0.5, 0.95))
                rr = rng.uniform(6, 16)
                rho = np.hypot((x - cx) / rr, (y - cy) / (rr * rng.uniform(0.5, 1.2)))
                B += (2 + 3 * po["sev"]) * _sig((1 - rho + 0.25 * _noise(rng, x.shape, 2 / fr.ps)) / 0.1) * inn
        else:   # apical / lateral pleural thickening
            add(0.8 * _sig((3 + 6 * po["sev"] - d) / 1.0) * inn * _sig((0.55 - t) / 0.05))


def _devices(rng, fr, G, F, S, h, Mm, Wm):
    xm, Hd = G["xm"], G["Hd"][-1]
    xt, yc, svc = xm + G["tr_dx"], 0.33 * Hd, (xm - G["Mr"] + 6, 0.3 * Hd)
    for dv in F["devices"]:
        if dv == "ett":   # tube wall plus its radio-opaque stripe; tip above the carina
            tip = yc - rng.uniform(20, 60)
            pts = _curve([(xt + 12, -260), (xt + 2, -120), (xt, tip - 40), (xt + rng.normal(0, 1), tip)])
            _tube(fr, Mm, pts, 5.0, 0.25, "wall")
            _tube(fr, Mm, pts + [1.8, 0], 0.9, 1.0, "flat")
        elif dv == "ng":   # down the oesophagus, across the left hemidiaphragm into the stomach
            xo, gy = G["xs"] + rng.uniform(4, 12), G["Hd"][1] + rng.uniform(10, 40)
            pts = _curve([(xt + 6, -260), (xo, 0.3 * Hd), (xo + 4, 0.8 * Hd), (xm + 0.4 * G["Wl"][1], gy),
                          (xm + 0.55 * G["Wl"][1], gy + rng.uniform(-20, 15))])
            _tube(fr, Mm, pts, 2.2, 0.3, "wall")
            _tube(fr, Mm, pts, 0.6, 0.9, "flat")
        elif dv in ("rij", "lij", "lsc", "picc"):   # venous catheters ending in the SVC / cavoatrial junction
            tipy, s = svc[1] + rng.uniform(-10, 45), _side(rng)
            ctrl = {"rij": [(xm - 45, -220), (xm - 38, -80), (svc[0] - 4, 0.05 * Hd)],
                    "lij": [(xm + 45, -220), (xm + 40, -70), (xm + 10, 0.12 * Hd)],
                    "lsc": [(xm + G["Wt"] * 0.7, -10), (xm + 45, 5), (xm + 5, 0.12 * Hd)],
                    "picc": [(xm + s * (G["Wt"] + 80), 40), (xm + s * (G["Wt"] - 10), -15), (xm + s * 40, 0.02 * Hd)]}
            _tube(fr, Mm, _curve(ctrl[dv] + [(svc[0], tipy)]), 1.1, 0.7, "flat")
        elif dv == "chest_tube":   # thick tube with a side hole, towards the apex
            s = F.get("pneumothorax", {}).get("side") or (F.get("effusion", {}).get("sides") or [1])[0]
            lx = xm + s * (G["Wl"][s] - 10)
            pts = _curve([(xm + s * (G["Wt"] + 60), 0.85 * Hd), (lx, 0.75 * Hd), (lx - s * 15, 0.35 * Hd),
                          (lx - s * 40, 0.1 * Hd)])
            _tube(fr, Mm, pts, 6.0, 0.25, "wall")
            _tube(fr, Mm, pts, 1.0, 1.0, "flat", gaps=[(pts[14][0], pts[14][1], 4.0)])
        elif dv == "pacer":   # generator below the clavicle, leads to the right atrium / ventricle
            s = 1 if rng.random() < 0.85 else -1
            gx, gy = xm + s * G["Wt"] * rng.uniform(0.45, 0.65), rng.uniform(-5, 20)
            g = fr.grid((gx - 40, gx + 40, gy - 40, gy + 40))
            if g is not None:
                sl, x, y = g
                rr = (np.abs(x - gx) / 24) ** 4 + (np.abs(y - gy) / 20) ** 4
                Mm[sl] += 5.0 * _sig((1 - rr) / 0.08) * (0.7 + 0.3 * (y < gy))
            ra = (h["xh"] - 0.5 * h["scale"], h["yh"] - 0.3 * h["scale"] * h["rb"])
            rv = (h["xh"] + 0.3 * h["scale"], h["yh"] + 0.1 * h["scale"] * h["rb"])
            mid = (svc[0] + 4, h["yh"] - 0.5 * h["scale"] * h["rb"])
            for tip in ([ra, rv] if rng.random() < 0.7 else [rv]):
                _tube(fr, Mm, _curve([(gx, gy), (xm + s * 30, 0.02 * Hd), (svc[0], 0.25 * Hd), mid, tip]), 1.2, 1.2,
                      "flat")
        elif dv == "sternal":   # twisted wire loops along the midline
            a = np.linspace(0, 2 * np.pi, 14)
            for k in range(int(rng.integers(5, 8))):
                cy, cx = 0.12 * Hd + k * rng.uniform(0.085, 0.1) * Hd, xm + rng.normal(0, 2)
                _tube(fr, Mm, np.stack([cx + 7 * np.cos(a), cy + 2.2 * np.sin(a)], 1), 0.7, 1.3, "flat")
                _tube(fr, Mm, [(cx + 6, cy), (cx + 10, cy + 1.5)], 1.3, 1.5, "flat")
    for _ in range(int(rng.integers(2, 6)) if S["portable"] and rng.random() < 0.7 else 0):
        ex, ey = xm + rng.uniform(-1.1, 1.1) * G["Wt"], rng.uniform(-0.1, 0.9) * Hd   # ECG electrodes (unreported)
        g = fr.grid((ex - 12, ex + 12, ey - 12, ey + 12))
        if g is not None:
            sl, x, y = g
            rho = np.hypot(x - ex, y - ey)
            Mm[sl] += 0.2 * np.exp(-((rho - 9) / 1.0) ** 2) + 1.5 * _sig((2.5 - rho) / 0.4)
            Wm[sl] += 2.0 * _sig((10 - rho) / 0.6)


# ----------------------------------------------------------------------------- lateral view
def _lateral(rng, pat, S, H, W):
    G, _ = _geometry(rng, pat, S, H, W)
    Dap, Hd = G["T0"] * rng.uniform(0.95, 1.1), G["Hd"][1]
    top, bot = rng.uniform(45, 100), rng.uniform(30, 90)
    need = Hd + 20 + top + bot
    ps = max(need / H, (Dap + 70) / W) * rng.uniform(1.0, 1.08)
    fr = Frame(H, W, ps, top / ps + (H - need / ps) * rng.uniform(0.2, 0.8), W / 2 + rng.normal(0, 0.03) * W,
               math.radians(rng.normal(0, 2)))
    _, x, y = fr.grid()
    Wm, B, Mm, tr = (np.zeros(x.shape, F32) for _ in range(4))
    neck = 0.55 + 0.45 * _sig((y + 5) / 22)   # anterior (image left) and posterior body contours
    ant = -Dap / 2 * neck - 0.06 * Dap * np.clip(y / Hd, 0, 1.5) ** 2
    post = Dap / 2 * (0.7 + 0.3 * neck) - 0.04 * Dap * np.clip(1 - y / Hd, 0, 1)
    Wm += 2 * (G["Wt"] + G["fat"]) * _sig((x - ant) / 2) * _sig((post - x) / 2) * (0.55 + 0.45 * neck)
    ant, post = -Dap / 2, Dap / 2
    ydl = Hd - G["dome"][1] * 0.4 + 35 * (x - ant) / Dap - 30 * np.exp(-((x + Dap * 0.05) / (0.25 * Dap)) ** 2)
    d = np.minimum.reduce([x - (ant + 18), post - 28 - x, ydl - y, y - 0.35 * Hd * (np.abs(x - 0.1 * Dap) / (
        0.5 * Dap)) ** 2])
    air = (G["Wl"][-1] + G["Wl"][1]) * 0.75 * _sig(d / 1.5) * (0.5 + 0.5 * (1 - np.exp(-np.maximum(d, 0) / 25)))
    e = S["F"].get("effusion")
    if e:   # posterior costophrenic sulcus first
        hgt = Hd * (0.03 + 0.5 * e["sev"])
        air *= 1 - 0.9 * _sig((y - (ydl - hgt * (0.3 + 0.7 * np.clip((x - ant) / Dap, 0, 1) ** 2))) / 2)
    hx, hy, c, s = ant + Dap * 0.33, Hd * 0.68, math.cos(0.5), math.sin(0.5)
    ha, hb = 0.26 * Dap * (0.55 + S["F"]["ctr"]), 0.16 * Hd
    rho = np.hypot((c * (x - hx) + s * (y - hy)) / ha, (-s * (x - hx) + c * (y - hy)) / hb)
    air *= 1 - 0.55 * _sig((1 - rho) * hb / 6)
    _tube(fr, tr, [(ant + 0.45 * Dap, -200), (ant + 0.5 * Dap, 0.1 * Hd), (ant + 0.56 * Dap, 0.33 * Hd)], 7, 14)
    Wm += -0.75 * air + 2.5 * _noise(rng, x.shape, 3 / fr.ps) * np.clip(air / 200, 0, 1) - tr
    per = Hd / 11.2
    ph = np.mod(y / per + rng.random(), 1.0)
    B += 18 * _sig((x - (post - 80)) / 2) * _sig((post - 42 - x) / 2) * (1 - 0.6 * np.exp(-((ph - 0.5) / 0.08) ** 2))
    B += 8 * _sig((x - ant - 4) / 1.5) * _sig((ant + 14 - x) / 1.5) * _sig((y - 0.05 * Hd) / 3) * _sig((0.7 * Hd - y) / 3)
    for k in range(10):
        _tube(fr, B, [(post - 30, -10 + k * per * 1.1), (post - 90, k * per * 1.1 + 15)], 5, 4)
    for k in range(6 if "sternal" in S["F"]["devices"] else 0):
        _tube(fr, Mm, [(ant + 6, 0.15 * Hd + k * 22), (ant + 14, 0.15 * Hd + k * 22 + 3)], 1.2, 1.5, "flat")
    return _expose(rng, fr, Wm, B, Mm, S, pat), fr.ps


# ----------------------------------------------------------------------------- projection and display
def _expose(rng, fr, Wm, B, Mm, S, pat):
    """Attenuation -> primary + scatter -> heel effect -> quantum noise -> log -> processing -> tone curve."""
    H, W, ps = fr.H, fr.W, fr.ps
    prim = np.exp(-(0.021 * np.clip(Wm, 0, None) + 0.045 * B + 0.6 * Mm)).astype(F32)
    sc = rng.uniform(0.08, 0.3) * (2.0 if S["portable"] else 1.0) * (1.5 if pat["habitus"] == "obese" else 1.0)
    I = (prim + sc * _blur(prim, 45 / ps)) * (1 + rng.uniform(-0.12, 0.12) * np.linspace(-0.5, 0.5, H, dtype=F32)[:, None])
    snr = rng.uniform(40, 110) * (0.75 if S["portable"] else 1.0) * ps ** 0.6
    sigma = np.minimum(1.0 / (snr * np.sqrt(np.clip(I, 1e-5, None) / 0.1)), 0.2)
    corr = _noise(rng, (H, W), rng.uniform(0.45, 1.1))
    L = -np.log(np.clip(I, 1e-5, None)) + sigma * corr   # quantum noise, applied in the log domain
    if rng.random() < 0.25:   # anti-scatter grid lines
        L += rng.uniform(0.004, 0.012) * np.sin(np.arange(W, dtype=F32) * rng.uniform(2.0, 2.9))[None, :]
    if rng.random() < 0.3:   # detector row banding
        L += ndimage.gaussian_filter1d(rng.standard_normal(H).astype(F32), 1.5)[:, None] * 0.006
    sub = L[::4, ::4]
    hi = np.percentile(sub, 99.8)
    lo = np.percentile(sub[sub > 0.3 * hi], rng.uniform(0.5, 6)) * rng.uniform(0.6, 0.95)   # black point near the lungs
    xv = (L - lo) / max(hi - lo, 1e-3)
    a = rng.uniform(0.0, 0.75)
    if a > 0.15:   # unsharp-mask equalisation, as in DR processing
        xv = xv + a * (xv - _blur(xv, rng.uniform(6, 25) / ps))
    xv = np.clip(xv - rng.uniform(0.0, 0.45) * (_blur(xv, 70 / ps) - 0.5), -0.2, 1.2)   # dynamic range compression
    if rng.random() < 0.5:   # gamma, or a film-like sigmoid
        xv = np.clip(xv, 0, 1) ** rng.uniform(0.7, 1.5)
    else:
        c, w = rng.uniform(0.42, 0.62), rng.uniform(0.13, 0.24)
        lo_, hi_ = 1 / (1 + math.exp(c / w)), 1 / (1 + math.exp(-(1 - c) / w))
        xv = (1 / (1 + np.exp(-(xv - c) / w)) - lo_) / (hi_ - lo_)
    xv = np.clip(xv, 0, 1).astype(F32)
    if rng.random() < 0.4:   # collimation borders (white: unexposed; black: electronic shutter), slightly rotated
        m, th = rng.uniform(0, 0.07, 4) * [H, H, W, W], rng.normal(0, 0.015)
        rr, cc = np.mgrid[0:H, 0:W].astype(F32)
        rr, cc = rr + th * (cc - W / 2), cc - th * (rr - H / 2)
        inside = (rr > m[0]) & (rr < H - m[1]) & (cc > m[2]) & (cc < W - m[3])
        xv = np.where(inside, xv, (0.0 if rng.random() < 0.25 else rng.uniform(0.85, 1.0)) + 0.01 * corr)
    return np.clip(xv, 0, 1).astype(F32)


# ----------------------------------------------------------------------------- reports
ORD = ["first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth", "tenth", "eleventh"]
LOBE = {"RUL": "right upper lobe", "RML": "right middle lobe", "RLL": "right lower lobe", "LUL": "lingula",
        "LLL": "left lower lobe"}
NEG_NP = {"Pleural Effusion": ["pleural effusion", "effusion", "pleural fluid"], "Pneumothorax": ["pneumothorax"],
          "Consolidation": ["focal consolidation", "consolidation", "confluent consolidation"],
          "Edema": ["pulmonary edema", "edema", "interstitial edema"], "Pneumonia": ["pneumonia"],
          "Lung Lesion": ["suspicious nodule", "mass or nodule"], "Atelectasis": ["atelectasis"],
          "Fracture": ["displaced rib fracture", "acute fracture"]}
DEVICE = {"ett": "endotracheal tube", "ng": "nasogastric tube", "rij": "right internal jugular central venous catheter",
          "lij": "left internal jugular catheter", "lsc": "left subclavian central line", "picc": "PICC line",
          "chest_tube": "chest tube", "pacer": "pacemaker", "sternal": "median sternotomy wires"}
INDICATIONS = ["dyspnea", "shortness of breath", "cough", "fever", "chest pain", "preoperative evaluation", "weakness",
               "hypoxia", "tachycardia", "fall", "for follow-up", "abnormal lab values", "syncope", "altered mental status",
               "desaturation", "leg swelling and dyspnea", "productive cough and fever", "for line placement",
               "for intubation", "for recent procedure", "hemoptysis", "weight loss", "rib pain after fall"]
BOOST = {"dyspnea": "edema", "shortness of breath": "effusion", "hypoxia": "edema", "fever": "consolidation",
         "productive cough and fever": "consolidation", "leg swelling and dyspnea": "edema", "hemoptysis": "lesion",
         "weight loss": "lesion", "rib pain after fall": "fracture", "fall": "pneumothorax"}


def _up(s):
    return s[:1].upper() + s[1:]


def _indication(rng, S, pat):
    """A clinician's question, only weakly related to what is drawn; never a statement of findings."""
    F = S["F"]
    w = np.array([1 + 0.8 * (BOOST.get(n) in F and not (n == "rib pain after fall" and F["fracture"]["healed"]))
                  for n in INDICATIONS])
    for i, n in enumerate(INDICATIONS):
        if n in ("for line placement", "for intubation", "for recent procedure"):
            w[i] = 0.3 + 2.0 * bool(set(F["devices"]) - {"pacer", "sternal"})
    sym = str(rng.choice(INDICATIONS, p=w / w.sum()))
    who = str(rng.choice([f"{pat['age']}-year-old {'woman' if pat['sex'] == 'F' else 'man'}", "Patient",
                          f"___{pat['sex']}", "History:", ""]))
    q = str(rng.choice(["", " Evaluate for acute process.", " ?process", " Please assess.", " Any interval change?",
                        " Eval for infiltrate.", " r/o acute cardiopulmonary pathology."]))
    if who in ("History:", ""):
        return _up(f"{who} {sym.removeprefix('for ')}.".strip()) + q
    return f"{who} {sym if sym.startswith('for ') else 'with ' + sym}." + q


def _sentences(rng, S):
    """Findings sentences, impression phrases and normal / negation sentences, all from the mention states."""
    F, M = S["F"], S["M"]
    C = lambda *xs: str(rng.choice(xs))  # noqa: E731
    hedges = ("may represent", "could reflect", "is suspicious for", "likely reflects", "possibly representing")
    hedge = lambda: C(*hedges)  # noqa: E731
    grade = lambda v, b: b.split("|")[int(np.searchsorted([0.15, 0.4, 0.7], v))]  # noqa: E731
    out, imp = [], []

    def say(txt, short=None, first=False):   # a findings sentence, and its impression phrase unless short is False
        out.append(txt)
        if short is not False:
            imp.insert(0 if first else len(imp), short or txt)
    for dv in F["devices"]:
        out.append({"ett": C("Endotracheal tube terminates approximately {} cm above the carina.",
                             "ET tube tip {} cm from the carina."),
                    "ng": C("Enteric tube courses below the diaphragm with tip in the stomach.",
                            "Nasogastric tube tip projects over the stomach."),
                    "pacer": C("Left chest wall pacemaker with leads in the right atrium and ventricle.",
                               "Cardiac pacing device in place."),
                    "sternal": C("Median sternotomy wires are intact.", "Sternotomy wires noted."),
                    "chest_tube": C("A pleural drain is in place.", "Chest tube projects over the hemithorax.")}.get(
            dv, f"{_up(DEVICE[dv])} {C('ends in the', 'tip projects over the', 'terminates at the')} "
                f"{C('SVC', 'cavoatrial junction', 'superior vena cava')}.").format(int(rng.integers(2, 7))))
    if F["devices"]:
        imp.append(C("Support devices as described.", _up(DEVICE[F["devices"][0]]) + " in place.",
                     "Lines and tubes as above."))
    if M["Consolidation"] in (1.0, -1.0):
        c = F["consolidation"]
        loc = LOBE.get(c["kind"], f"{SIDE[c['side']]} lung")
        pna = {1.0: C(", consistent with pneumonia", ", compatible with pneumonia"),
               -1.0: C(", concerning for pneumonia", "; pneumonia is not excluded", ", possibly pneumonia")}.get(
            M["Pneumonia"], "")
        if M["Consolidation"] == 1.0:
            kind = C("Airspace consolidation", "Dense consolidation", "Patchy consolidation", "Consolidative opacity")
            say(f"{kind} in the {loc}{pna}.", f"{_up(loc)} consolidation{pna}.")
        else:
            say(f"Subtle opacity in the {loc} {hedge()} early consolidation{pna}.", f"Possible {loc} consolidation{pna}.")
    if "opacity" in F:
        o = F["opacity"]
        loc = f"{SIDE[o['side']]} {'base' if o['t'] > 0.65 else 'mid lung'}"
        if o["atx_or_pna"]:
            say(f"Ill-defined {loc} opacity may reflect atelectasis, though pneumonia cannot be excluded.",
                f"{_up(loc)} opacity: atelectasis versus pneumonia.")
        else:
            say(f"{C('Hazy', 'Faint', 'Ill-defined', 'Patchy')} opacity at the {loc}.", f"{_up(loc)} opacity.")
    if M["Pneumonia"] == -1.0 and not ("consolidation" in F or "opacity" in F):
        say(C("No focal consolidation, although early pneumonia cannot be excluded clinically.",
              "Early pneumonia cannot be excluded radiographically."), False)
        M["Consolidation"] = 0.0 if out[-1].startswith("No") else M["Consolidation"]
    if M["Edema"] in (1.0, -1.0):
        g = grade(F["edema"]["sev"], "mild|mild|moderate|severe")
        if M["Edema"] == 1.0:
            say(C(f"{_up(g)} interstitial pulmonary edema.", f"There is {g} pulmonary edema with perihilar haziness.",
                  f"Findings of {g} pulmonary edema with indistinct vessels."),
                C(f"{_up(g)} pulmonary edema.", f"{_up(g)} congestive heart failure with edema."))
        else:
            say(f"Hazy perihilar opacities {hedge()} mild edema.", "Possible mild pulmonary edema.")
    if M["Atelectasis"] in (1.0, -1.0) and "atelectasis" in F:
        a = F["atelectasis"]
        sd = "bibasilar" if a["bilateral"] and a["kind"] in ("plate", "basilar") else f"{SIDE[a['side']]} basilar"
        txt = f"Streaky {sd} opacity, {C('likely', 'probably', 'possibly')} atelectasis." if M["Atelectasis"] == -1.0 else {
            "plate": f"{C('Plate-like', 'Linear', 'Discoid')} atelectasis, {sd}.",
            "basilar": f"{C('Minimal', 'Mild', 'Subsegmental')} {sd} atelectasis.",
            "LLL": "Retrocardiac density with volume loss, compatible with left lower lobe collapse.",
            "RUL": "Right upper lobe collapse with elevation of the minor fissure."}[a["kind"]]
        say(txt, txt if rng.random() < 0.5 else txt.split(",")[0].rstrip(".") + ".")
    if M["Lung Lesion"] in (1.0, -1.0):
        les = F["lesion"]
        big = max(les, key=lambda z: z["d"])
        loc = f"{SIDE[big['side']]} {['upper', 'mid', 'lower'][min(2, int(big['t'] * 3))]} lung"
        dim = f"{big['d'] / 10:.1f} cm" if big["d"] >= 20 else f"{int(round(big['d']))} mm"
        if M["Lung Lesion"] == -1.0:
            say(f"A {dim} nodular opacity in the {loc} {hedge()} a pulmonary nodule.",
                "Possible pulmonary nodule; CT could be considered.")
        elif len(les) > 1:
            say(f"Multiple pulmonary nodules, the largest {dim} in the {loc}.",
                "Multiple pulmonary nodules, suspicious for metastases.")
        elif big["kind"] == "mass":
            say(f"{dim} {C('mass', 'lobulated mass')} in the {loc}.",
                f"{C('Lung mass', 'Pulmonary mass')}, {C('concerning for malignancy', 'recommend CT')}.")
        else:
            say(f"{C('There is a', 'A')} {dim} nodule in the {loc}.", f"{dim} {SIDE[big['side']]} pulmonary nodule.")
    if M["Pleural Effusion"] in (1.0, -1.0):
        e = F["effusion"]
        g, sd = "trace" if e["sev"] < 0.06 else grade(e["sev"], "small|small|moderate|large"), SIDE[e["sides"][0]]
        if M["Pleural Effusion"] == -1.0:
            say(C(f"Blunting of the {sd} costophrenic angle {hedge()} a small effusion.",
                  f"A trace {sd} effusion cannot be excluded."))
        elif len(e["sides"]) == 2:
            say(f"{C('Bilateral', 'Right and left')} {g} pleural effusions.")
        else:
            say(C(f"{_up(g)} {sd} pleural effusion.",
                  f"There is a {g} {sd} effusion{' layering posteriorly' * S['supine']}."))
    if M["Pneumothorax"] in (1.0, -1.0):
        p = F["pneumothorax"]
        say(f"Subtle lucency at the {SIDE[p['side']]} apex {hedge()} a tiny pneumothorax." if M["Pneumothorax"] == -1.0 else
            f"{C('There is a', 'A')} {grade(p['sev'], 'tiny apical|small|moderate|large')} {SIDE[p['side']]} pneumothorax.",
            first=True)
    if M["Cardiomegaly"] in (1.0, -1.0):
        g = grade((F["ctr"] - 0.5) * 5, "mild|mild|moderate|marked")
        say(C("Heart size is borderline, possibly mildly enlarged.",
              "The cardiac silhouette is top-normal to mildly enlarged.") if M["Cardiomegaly"] == -1.0 else
            C(f"{_up(g)} cardiomegaly.", f"The heart is {g}ly enlarged.",
              f"{_up(g)} enlargement of the cardiac silhouette."))
    if M["Enlarged Cardiomediastinum"] in (1.0, -1.0):
        say("The mediastinum appears slightly widened, which may be projectional."
            if M["Enlarged Cardiomediastinum"] == -1.0
            else C("The superior mediastinum is widened.", "Mediastinal widening is noted."))
    if M["Pleural Other"] in (1.0, -1.0):
        po = F["pleural_other"]
        say(f"Possible pleural thickening along the {SIDE[po['side']]} chest wall." if M["Pleural Other"] == -1.0
            else "Calcified pleural plaques, likely related to prior asbestos exposure." if po["kind"] == "plaques"
            else f"{_up(SIDE[po['side']])} apical pleural thickening.", False)
    if M["Fracture"] in (1.0, -1.0):
        fx = F["fracture"]
        rib = f"{SIDE[fx['side']]} {ORD[fx['rib']]} posterolateral rib"
        say(f"Possible {'old' if fx['healed'] else 'nondisplaced'} fracture of the {rib}." if M["Fracture"] == -1.0
            else f"{'Healed' if fx['healed'] else 'Acute'} fracture of the {rib}.")
    if M["Lung Opacity"] == 1.0:   # asserted only where the text names an opacity / density / haze
        M["Lung Opacity"] = 1.0 if re.search(r"opacit|densit|haz", " ".join(out).lower()) else None
    normal, cm, ecm = [], M["Cardiomegaly"] == 0.0, M["Enlarged Cardiomediastinum"] == 0.0
    if cm or ecm:
        normal.append(C("The cardiomediastinal silhouette is within normal limits.", "Normal cardiomediastinal contours.")
                      if cm and ecm else
                      C("Heart size is normal.", "Normal heart size.", "The heart is not enlarged.") if cm else
                      C("Mediastinal contours are unremarkable.", "Normal mediastinal and hilar contours."))
    if M["Lung Opacity"] == 0.0:
        normal.append(C("The lungs are clear.", "Lungs are clear.", "Clear lungs."))
    fx_said = M["Fracture"] == 0.0 and rng.random() < 0.6
    if fx_said:
        normal.append(C("No acute osseous abnormality.", "Osseous structures are intact."))
    negs = [k for k in NEG_NP if M.get(k) == 0.0 and not (k == "Fracture" and fx_said)
            and not (k == "Consolidation" and any(s.startswith("No focal consolidation") for s in out))]
    rng.shuffle(negs)
    while negs:   # negated findings, one to three per sentence
        n = int(rng.integers(1, 4))
        chunk, negs = negs[:n], negs[n:]
        nps = [str(rng.choice(NEG_NP[k])) for k in chunk]
        lst = nps[0] if len(nps) == 1 else ", ".join(nps[:-1]) + f" {C('or', 'or', 'and')} " + nps[-1]
        lungs_only = all(k in ("Consolidation", "Edema", "Lung Lesion") for k in chunk)
        normal.append(C(f"No {lst}.", f"There is no {lst}.", f"No evidence of {lst}.", f"Without {lst}.",
                        f"The lungs are free of {lst}." if lungs_only else f"No {lst} is seen."))
    return out, normal, imp


def _report(rng, S, pat, views):
    """One of several layouts: headed FINDINGS/IMPRESSION, old-style unheaded paragraphs, header synonyms..."""
    find, normal, imp = _sentences(rng, S)
    body = find + normal if rng.random() < 0.6 else [*normal[:1], *find, *normal[1:]]
    imp = imp or [str(rng.choice(["No acute cardiopulmonary process.", "No acute intrathoracic abnormality.",
                                  "Normal chest radiograph.", "No radiographic evidence of acute disease."]))]
    ap, lat = "AP" in views, any(v in ("LATERAL", "LL") for v in views)
    exam = "CHEST (PORTABLE AP)" if ap else "CHEST (PA AND LAT)" if lat else "CHEST (PA)"
    tech = ("Single portable AP view of the chest" + (", supine." if S["supine"] else ", semi-upright.")) if ap \
        else ("PA and lateral views of the chest." if lat else "Single PA view of the chest.")
    comp = str(rng.choice(["None.", "___.", "Chest radiograph from ___.", "No prior studies available.",
                           "Prior study of ___."]))
    ind = _indication(rng, S, pat) if rng.random() < 0.85 else None
    wrap = lambda s: "\n ".join(textwrap.wrap(s, 72, break_on_hyphens=False))  # noqa: E731
    Hd = lambda xs: str(rng.choice(xs))  # noqa: E731
    style = str(rng.choice(["modern", "old", "variant", "impression_only"], p=[0.45, 0.2, 0.25, 0.1]))
    var = style == "variant"
    parts = ["                                 FINAL REPORT"]
    if style == "old":   # no FINDINGS header: unheaded paragraphs after the history
        parts.append(f" {exam.replace('CHEST', 'CHEST RADIOGRAPH')} ___")
        if ind:
            parts.append(f" {Hd(['REASON FOR EXAM:', 'HISTORY:', 'CLINICAL HISTORY:'])} {wrap(ind)}")
        parts.append(" " + wrap(" ".join(body)))
        parts.append((" " + Hd(["IMPRESSION:", "Impression:"]) + " " if rng.random() < 0.6 else " ") + wrap(" ".join(imp)))
    else:
        parts.append(f" {Hd(['EXAMINATION:', 'EXAM:', 'Examination:']) if var else 'EXAMINATION:'}  {exam}")
        if ind:
            ih = Hd(["INDICATION:", "CLINICAL INFORMATION:", "REASON FOR STUDY:", "HISTORY:", "Clinical history:",
                     "Indication:"]) if var else "INDICATION:"
            parts.append(f" {ih}  {wrap(ind)}")
        parts += [f" TECHNIQUE:  {tech}", f" COMPARISON:  {comp}"]
        if style != "impression_only":
            parts.append(f" {Hd(['FINDINGS:', 'Findings:', 'FINDINGS', 'REPORT:']) if var else 'FINDINGS:'}\n \n "
                         + wrap(" ".join(body)))
        ih = Hd(["IMPRESSION:", "CONCLUSION:", "Impression:", "CONCLUSIONS:", "SUMMARY:"]) if var else "IMPRESSION:"
        parts.append(f" {ih}\n \n " + wrap(" ".join(imp if style != "impression_only" else (find or imp) + normal)))
    return "\n \n".join(parts) + "\n"


# ----------------------------------------------------------------------------- DICOM
def _uid(rng):
    return "2.25." + str(int.from_bytes(rng.bytes(15), "big"))


def _write_dicom(path, img, rng, info):
    """Part-10 DX or CR: MONOCHROME1/2, 8/12/14 bits stored, optional rescale and VOI window, implicit or explicit VR."""
    cr = rng.random() < 0.35
    bits = int(rng.choice([12, 14, 8], p=[0.5, 0.38, 0.12]))
    mono1, maxv, sop = rng.random() < (0.45 if cr else 0.08), 2 ** bits - 1, CR_SOP if cr else DX_SOP
    stored = np.round(img * maxv * rng.uniform(0.9, 1.0)).astype(np.uint16)
    stored = (maxv - stored).astype(np.uint16) if mono1 else stored
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = sop, _uid(rng)
    meta.TransferSyntaxUID = ImplicitVRLittleEndian if rng.random() < 0.35 else ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    spacing = [f"{info['ps']:.4f}"] * 2
    for k, v in {"SOPClassUID": sop, "SOPInstanceUID": meta.MediaStorageSOPInstanceUID,
                 "StudyInstanceUID": info["study_uid"],
                 "SeriesInstanceUID": _uid(rng), "Modality": "CR" if cr else "DX", "PatientName": "SYNTHETIC^INDEPENDENT",
                 "PatientID": f"FAKE{info['subject_id']}", "PatientBirthDate": "21000101", "PatientSex": info["sex"],
                 "PatientAge": f"{info['age']:03d}Y", "StudyDate": info["date"], "SeriesDate": info["date"],
                 "StudyTime": info["time"], "AccessionNumber": f"FAKE{info['study_id']}", "StudyID": info["study_id"][-6:],
                 "ReferringPhysicianName": "NOBODY^FAKE", "InstitutionName": "NOT A REAL HOSPITAL",
                 "Manufacturer": "INDEPENDENT SYNTHETIC", "SeriesNumber": 1, "InstanceNumber": info["instance"],
                 "BodyPartExamined": "CHEST", "ViewPosition": info["view"], "StudyDescription": info["desc"],
                 "ImageType": ["ORIGINAL", "PRIMARY"], "BurnedInAnnotation": "NO", "SamplesPerPixel": 1,
                 "PhotometricInterpretation": "MONOCHROME1" if mono1 else "MONOCHROME2", "Rows": img.shape[0],
                 "Columns": img.shape[1], "PixelSpacing": spacing, "ImagerPixelSpacing": spacing,
                 "BitsAllocated": 8 if bits == 8 else 16, "BitsStored": bits, "HighBit": bits - 1,
                 "PixelRepresentation": 0}.items():
        setattr(ds, k, v)
    if not cr:
        ds.PresentationIntentType, ds.PresentationLUTShape = "FOR PRESENTATION", "INVERSE" if mono1 else "IDENTITY"
    slope, icpt = 1.0, 0.0
    if rng.random() < 0.3:
        slope, icpt = float(rng.choice([0.5, 1.0, 2.0])), float(rng.choice([0.0, -1024.0, 100.0]))
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = f"{slope:g}", f"{icpt:g}", "US"
    if rng.random() < 0.6:
        ds.WindowCenter = f"{icpt + slope * maxv * rng.uniform(0.45, 0.55):.1f}"
        ds.WindowWidth = f"{slope * maxv * rng.uniform(0.85, 1.05):.1f}"
    ds.PixelData = (stored.astype(np.uint8) if bits == 8 else stored.astype("<u2")).tobytes()
    ds.save_as(path, enforce_file_format=True)


# ----------------------------------------------------------------------------- corpus driver
def _image_shape(rng, size, view, portable):
    if size >= 1536:   # full-size detector class (e.g. 2048 x 1792)
        long_ = int(size * rng.uniform(0.95, 1.0)) // 2 * 2
        short = int(long_ * rng.uniform(0.84, 0.9)) // 2 * 2
    else:
        long_ = max(64, int(size * rng.uniform(0.75, 1.25)) // 2 * 2)
        short = int(long_ * rng.uniform(0.8, 1.0)) // 2 * 2
    return (short, long_) if view == "AP" and portable and rng.random() < 0.15 else (long_, short)   # landscape cassette


def _work(task):
    """Render and write one study; returns its table rows. Seeded only by (seed, study index)."""
    seed, idx, st, pat, size, root = task
    rng = np.random.default_rng([seed, 7919, idx])
    S = _sample_study(rng, pat)
    views = ["AP" if S["portable"] else "PA"]
    views += views * (rng.random() < 0.04)   # a repeated frontal
    if rng.random() < (0.3 if not S["portable"] else 0.06):
        views.append("LATERAL" if rng.random() < 0.85 else "LL")
    subj, study = st["subject_id"], st["study_id"]
    sdir = Path(root) / "files" / f"p{subj[:2]}" / f"p{subj}"
    (sdir / f"s{study}").mkdir(parents=True, exist_ok=True)
    (sdir / f"s{study}.txt").write_text(_report(rng, S, pat, views), encoding="utf-8")
    info = {"subject_id": subj, "study_id": study, "sex": pat["sex"], "age": pat["age"], "date": st["date"],
            "time": f"{int(rng.integers(0, 24)):02d}{int(rng.integers(0, 60)):02d}{int(rng.integers(0, 60)):02d}",
            "study_uid": _uid(rng), "desc": "CHEST (PORTABLE AP)" if S["portable"] else "CHEST (PA AND LAT)"}
    rows = []
    for k, v in enumerate(views):
        H, W = _image_shape(rng, size, v, S["portable"])
        img, ps = _frontal(rng, pat, S, H, W) if v in ("PA", "AP") else _lateral(rng, pat, S, H, W)
        h = rng.bytes(20).hex()
        dicom_id = "-".join(h[i:i + 8] for i in range(0, 40, 8))
        _write_dicom(sdir / f"s{study}" / f"{dicom_id}.dcm", img, rng, dict(info, view=v, instance=k + 1, ps=float(ps)))
        rows.append({"dicom_id": dicom_id, "subject_id": subj, "study_id": study, "ViewPosition": v, "Rows": H,
                     "Columns": W, "StudyDate": st["date"], "StudyTime": info["time"],
                     "PerformedProcedureStepDescription": info["desc"],
                     "ViewCodeSequence_CodeMeaning": {"PA": "postero-anterior", "AP": "antero-posterior",
                                                      "LATERAL": "lateral", "LL": "left lateral"}[v]})
    return rows, {"subject_id": subj, "study_id": study, **{k: S["M"].get(k) for k in LABELS}}, st["split"]


def _plan(n_studies, seed):
    """Patients (1-several studies each), unique 8-digit ids, a patient-level split and fake future dates."""
    rng = np.random.default_rng([seed, 104729])
    plan, subjects, studies = [], set(), set()
    while len(plan) < n_studies:
        subj = str(int(rng.integers(10_000_000, 20_000_000)))
        if subj in subjects:
            continue
        subjects.add(subj)
        pat, split = _patient(rng), str(rng.choice(["train", "validate", "test"], p=[0.8, 0.1, 0.1]))
        day = int(rng.integers(0, 30000))
        for _ in range(min(int(rng.geometric(0.55)), n_studies - len(plan))):
            sid = str(int(rng.integers(50_000_000, 60_000_000)))
            while sid in studies:
                sid = str(int(rng.integers(50_000_000, 60_000_000)))
            studies.add(sid)
            day += int(rng.integers(1, 400))
            date = (np.datetime64("2110-01-01") + np.timedelta64(day, "D")).astype(str).replace("-", "")
            plan.append(({"subject_id": subj, "study_id": sid, "split": split, "date": date}, pat))
    return plan


def _write_gz(df, path):
    with open(path, "wb") as fh, gzip.GzipFile(filename="", mode="wb", fileobj=fh, mtime=0) as gz:
        gz.write(df.to_csv(index=False).encode())


def generate(out_dir, n_studies, seed=0, size=320, workers=2, progress=True) -> dict:
    """Write an independent synthetic corpus in the MIMIC-CXR layout under ``out_dir``; returns a summary."""
    root = Path(out_dir)
    if (root / "files").is_dir() and any((root / "files").iterdir()):
        raise SystemExit(f"{root}/files already holds data; choose an empty --out")
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    tasks = [(seed, i, st, pat, size, str(root)) for i, (st, pat) in enumerate(_plan(n_studies, seed))]
    results, step = [], max(1, n_studies // 10)
    pool = get_context("fork").Pool(workers) if workers > 1 and n_studies > 1 else None
    try:
        for r in (pool.imap(_work, tasks, chunksize=1) if pool else map(_work, tasks)):
            results.append(r)
            if progress and (len(results) % step == 0 or len(results) == n_studies):
                rate = len(results) / max(time.time() - t0, 1e-9)
                print(f"indep_corpus: {len(results)}/{n_studies} studies ({100 * len(results) // n_studies}%), "
                      f"{rate:.2f} studies/s", file=sys.stderr, flush=True)
    finally:
        if pool:
            pool.close()
            pool.join()
    meta = pd.DataFrame([row for r in results for row in r[0]])
    split = meta[["dicom_id", "study_id", "subject_id"]].assign(split=[r[2] for r in results for _ in r[0]])
    chex = pd.DataFrame([r[1] for r in results])[["subject_id", "study_id", *LABELS]]
    _write_gz(split, root / "mimic-cxr-2.0.0-split.csv.gz")
    _write_gz(chex, root / "mimic-cxr-2.0.0-chexpert.csv.gz")
    _write_gz(meta, root / "mimic-cxr-2.0.0-metadata.csv.gz")
    count = lambda v: {k: int((chex[k] == v).sum()) for k in LABELS}  # noqa: E731
    summary = {"studies": len(results), "patients": int(chex["subject_id"].nunique()), "images": len(meta),
               "views": dict(Counter(meta["ViewPosition"])), "splits_images": dict(Counter(split["split"])),
               "splits_studies": dict(Counter(r[2] for r in results)), "positives": count(1.0),
               "uncertain": count(-1.0), "negated": count(0.0), "seed": seed, "size": size}
    (root / "indep_corpus_summary.json").write_text(json.dumps(summary, indent=1, sort_keys=True))
    elapsed = time.time() - t0
    return dict(summary, seconds=round(elapsed, 2), studies_per_s=round(len(results) / max(elapsed, 1e-9), 3))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--studies", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size", type=int, default=320, help="long side of normal images in pixels (2048: full size)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    print(json.dumps(generate(a.out, a.studies, a.seed, a.size, a.workers), indent=1, sort_keys=True))


if __name__ == "__main__":
    main()
