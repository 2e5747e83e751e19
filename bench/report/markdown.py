"""The report: the project's targets judged from the measured medians, and the Markdown printed on stdout."""
from __future__ import annotations

from typing import Any

from gradcam_engine.bench.contenders import FORWARD, GRADCAM, METHODS, REFERENCE
from gradcam_engine.bench.measure.images import PHOTO_SIZE

SPEEDUP_TARGET = 20.0          # best fused Grad-CAM img/s / reference img/s
TAX_TARGET = 0.95              # Grad-CAM img/s / forward-only img/s, same runtime, precision and batch
METHODS_TARGET = 0.95          # all CAM methods img/s / Grad-CAM alone img/s, same runtime, precision and batch
END_TO_END_TARGET = 0.85       # JPEG -> Parquet img/s / model-only img/s on the same images and batch
MEMORY_GROWTH_TARGET = 0.15    # peak RSS of the largest dataset over the smallest, minus one
MEMORY_LIMIT_MB = 2048.0
INT8_TARGET = 2.5              # int8 Grad-CAM img/s / fp32 Grad-CAM img/s, ONNX Runtime CPU, same batch
INT8_END_TO_END_TARGET = 35.0  # int8 end to end (JPEG -> Parquet) img/s / reference img/s
BF16_TARGET = 1.8              # bf16 Grad-CAM img/s / fp32 Grad-CAM img/s, TensorFlow CPU, same batch


def _model_rows(report: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    return [r for r in report["results"] if r["group"] == "model" and r["kind"] == kind and r["images_per_second"]]


def best_gradcam(report: dict[str, Any]) -> dict[str, Any] | None:
    """The fastest Grad-CAM configuration by median img/s."""
    rows = _model_rows(report, GRADCAM)
    return max(rows, key=lambda r: r["images_per_second"]) if rows else None


def _target(name: str, measured: float | None, goal: str, met: bool | None, detail: str) -> dict[str, Any]:
    return {"target": name, "measured": measured, "goal": goal, "met": met, "detail": detail}


def _label(r: dict[str, Any]) -> str:
    return f"{r['contender']} b={r['batch_size']}"


def targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target with its measured value and met / missed (None: not measured in this run)."""
    out = []
    best = best_gradcam(report)
    ref = next(iter(_model_rows(report, REFERENCE)), None)
    if best and ref:
        x = best["images_per_second"] / ref["images_per_second"]
        out.append(_target("best fused Grad-CAM vs reference (img/s)", x, f">= {SPEEDUP_TARGET:g}x",
                           x >= SPEEDUP_TARGET, f"{_label(best)} {best['images_per_second']:.2f} img/s vs reference "
                           f"{ref['images_per_second']:.3f} img/s"))
    else:
        out.append(_target("best fused Grad-CAM vs reference (img/s)", None, f">= {SPEEDUP_TARGET:g}x", None,
                           "needs the reference and a fused contender"))
    paired = [r for r in _model_rows(report, GRADCAM) if r.get("vs_forward")]
    if paired:
        chosen = best if best and best.get("vs_forward") else max(paired, key=lambda r: r["images_per_second"])
        low, high = min(r["vs_forward"] for r in paired), max(r["vs_forward"] for r in paired)
        out.append(_target("Grad-CAM / forward-only, same runtime and batch", chosen["vs_forward"],
                           f">= {TAX_TARGET:g}", chosen["vs_forward"] >= TAX_TARGET,
                           f"{_label(chosen)} vs {chosen['forward_pair']}; all {len(paired)} pairs: "
                           f"{low:.2f}-{high:.2f}"))
    else:
        out.append(_target("Grad-CAM / forward-only, same runtime and batch", None, f">= {TAX_TARGET:g}", None,
                           "needs a forward-only contender (a Keras model)"))
    e2e = next((r for r in report["results"] if r["kind"] == "end-to-end" and r["images_per_second"]), None)
    only = next((r for r in report["results"] if r["kind"] == "model-only" and r["images_per_second"]), None)
    if e2e and only:
        x = e2e["images_per_second"] / only["images_per_second"]
        out.append(_target("end to end (JPEG -> Parquet) / model-only", x, f">= {END_TO_END_TARGET:g}",
                           x >= END_TO_END_TARGET, f"{e2e['images_per_second']:.2f} vs {only['images_per_second']:.2f}"
                           f" img/s, {e2e['images']} images, batch {e2e['batch_size']}, {e2e['runtime']}"))
    else:
        out.append(_target("end to end (JPEG -> Parquet) / model-only", None, f">= {END_TO_END_TARGET:g}", None,
                           "end-to-end not run"))
    out += _precision_targets(report, ref)
    sweep = sorted(report.get("dataset_sweep", []), key=lambda r: r["images"])
    if len(sweep) >= 2:
        small, large = sweep[0], sweep[-1]
        growth = large["peak_rss_mb"] / small["peak_rss_mb"] - 1.0
        met = growth <= MEMORY_GROWTH_TARGET and large["peak_rss_mb"] < MEMORY_LIMIT_MB
        out.append(_target(f"end-to-end peak RSS, {large['images']} vs {small['images']} images", growth,
                           f"<= +{MEMORY_GROWTH_TARGET:.0%} and < {MEMORY_LIMIT_MB / 1024:g} GB", met,
                           f"{large['peak_rss_mb']:.0f} MB vs {small['peak_rss_mb']:.0f} MB (fresh processes)"))
    else:
        out.append(_target("end-to-end peak RSS across dataset sizes", None,
                           f"<= +{MEMORY_GROWTH_TARGET:.0%} and < {MEMORY_LIMIT_MB / 1024:g} GB", None,
                           "needs two dataset sizes"))
    out.append(_methods_target(report))  # last: the earlier targets keep their places
    return out


def _methods_target(report: dict[str, Any]) -> dict[str, Any]:
    """All CAM methods from one graph vs Grad-CAM alone: judged at the largest batch of the first runtime."""
    name = "all CAM methods / Grad-CAM alone, same runtime and batch"
    paired = [r for r in _model_rows(report, METHODS) if r.get("vs_gradcam")]
    if not paired:
        return _target(name, None, f">= {METHODS_TARGET:g}", None, "needs a Keras model and --methods with two or more")
    chosen = max(paired, key=lambda r: (r["runtime"].startswith("onnx"), r["batch_size"]))
    methods = ", ".join(report["model"].get("methods", []))
    all_pairs = "; ".join(f"{_label(r)} {r['vs_gradcam']:.3f}" for r in paired)
    return _target(name, chosen["vs_gradcam"], f">= {METHODS_TARGET:g}", chosen["vs_gradcam"] >= METHODS_TARGET,
                   f"{_label(chosen)} vs {chosen['gradcam_pair']} (median of per-round ratios; in CPU time "
                   f"{chosen['vs_gradcam_cpu']:.3f}; methods: {methods}); all pairs: {all_pairs}")


def _side_by_side(report: dict[str, Any], runtime: str, precision: str) -> tuple[dict | None, dict | None]:
    """A reduced precision's Grad-CAM row and fp32's on the same runtime, at the largest batch both have."""
    rows = {(r["precision"], r["batch_size"]): r for r in _model_rows(report, GRADCAM) if r["runtime"] == runtime}
    common = [b for p, b in rows if p == precision and ("fp32", b) in rows]
    if not common:
        return None, None
    return rows[(precision, max(common))], rows[("fp32", max(common))]


def _precision_targets(report: dict[str, Any], ref: dict[str, Any] | None) -> list[dict[str, Any]]:
    """int8 and bf16 against fp32 side by side; int8 end to end against the reference."""
    out = []
    for precision, runtime, goal in (("int8", "onnx-cpu", INT8_TARGET), ("bf16", "tf-cpu", BF16_TARGET)):
        fast, base = _side_by_side(report, runtime, precision)
        name = f"{precision} Grad-CAM vs fp32, {runtime} (img/s)"
        if fast and base:
            x = fast["images_per_second"] / base["images_per_second"]
            out.append(_target(name, x, f">= {goal:g}x", x >= goal, f"b={fast['batch_size']}: "
                               f"{fast['images_per_second']:.2f} vs {base['images_per_second']:.2f} img/s"))
        else:
            out.append(_target(name, None, f">= {goal:g}x", None, f"no {precision} contender in this run"))
    e2e = next((r for r in report["results"] if r["kind"] == "end-to-end" and r["precision"] == "int8"
                and r["images_per_second"]), None)
    name = "int8 end to end (JPEG -> Parquet) vs reference (img/s)"
    if e2e and ref:
        x = e2e["images_per_second"] / ref["images_per_second"]
        out.append(_target(name, x, f">= {INT8_END_TO_END_TARGET:g}x", x >= INT8_END_TO_END_TARGET,
                           f"{e2e['images_per_second']:.2f} vs reference {ref['images_per_second']:.3f} img/s, "
                           f"batch {e2e['batch_size']}"))
    else:
        out.append(_target(name, None, f">= {INT8_END_TO_END_TARGET:g}x", None, "needs int8 end to end and the "
                           "reference"))
    return out


def _gate_lines(report: dict[str, Any]) -> list[str]:
    """The precision gate's figures for the reduced-precision files timed here (a random-weight model's quality
    says little; on a trained model see the tests and the README)."""
    gate = report.get("precision_gate")
    if not gate:
        return []
    images = gate["images"]
    lines = ["", f"Precision gate (export, vs fp32 on {images['images']} {images['kind']}):"]
    for label, entry in gate["results"].items():
        f = entry["figures"]
        outcome = "passed" if entry["passed"] else "missed " + ", ".join(entry["failed"])
        name = label if entry["precision"] in label else f"{label} ({entry['precision']})"
        lines.append(f"- {name}: top-1 agreement {f['top1_agreement']:.1%}, CAM correlation "
                     f"mean {f['cam_corr_mean']:.4f} / worst {f['cam_corr_worst']:.4f}, max abs "
                     f"{f['cam_max_abs_diff']:.3f}: {outcome}")
    return lines


def _f(x: float | None, digits: int = 2) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def _ips(r: dict[str, Any]) -> str:
    digits = 3 if (r["images_per_second"] or 0) < 1 else 2 if (r["images_per_second"] or 0) < 100 else 0
    return (f"{_f(r['images_per_second'], digits)} ({_f(r['images_per_second_min'], digits)}–"
            f"{_f(r['images_per_second_max'], digits)})")


def _latency(r: dict[str, Any]) -> str:
    if r["latency_p50_ms"] is None:
        return "—"
    return f"{r['latency_p50_ms']:.0f} / {r['latency_p95_ms']:.0f}"


def _memory(r: dict[str, Any]) -> str:
    m = r.get("own_process_memory")
    return "—" if not m else f"{m['peak_rss_mb']:.0f}"


def _ratio(x: float | None, suffix: str = "x") -> str:
    return "—" if x is None else f"{x:.2f}{suffix}" if x < 10 else f"{x:.1f}{suffix}"


def _machine_line(report: dict[str, Any]) -> str:
    m = report["machine"]
    v = m["versions"]
    gpu = ", ".join(m["gpus"]) or "no GPU"
    features = [k for k, on in m.get("cpu_features", {}).items() if on and k not in ("avx2", "avx512f")]
    absent = [k for k, on in m.get("cpu_features", {}).items() if not on]
    isa = f"; CPU features {', '.join(features) or 'none of note'} (not: {', '.join(absent)})" if features or absent \
        else ""
    return (f"{m['cpu']}, {m['usable_cores']} cores, {m['memory_gb']} GB, {gpu}{isa}; load average at start "
            f"{m['load_average_at_start']}; onnxruntime {v['onnxruntime']}, tensorflow {v['tensorflow']}, "
            f"keras {v['keras']}, numpy {v['numpy']}")


def _verdict(met: bool | None) -> str:
    return {True: "MET", False: "MISSED", None: "NOT MEASURED"}[met]


def _checks_line(checks: list[dict[str, Any]]) -> str:
    bad = [c for c in checks if not c["ok"]]
    if bad:
        details = "; ".join(f"{c['contender']} ({ {k: v for k, v in c.items() if k not in ('contender', 'ok')} })"
                            for c in bad)
        return f"Checks before timing: MISMATCH, not timed: {details}"
    cams = [c["cam_max_abs_diff"] for c in checks if "cam_max_abs_diff" in c]
    against = next((c["against"] for c in checks if c.get("against") not in (None, "itself")), "the reference")
    e2e = any(c["contender"].startswith("end-to-end") for c in checks)
    return (f"Checks before timing: all {len(checks)} contenders agree with {against} on the same images (max CAM "
            f"difference {max(cams, default=0.0):.1e}, same target classes and top-1"
            + ("; the end-to-end Parquet CAMs equal model-only's)." if e2e else ")."))


def markdown(report: dict[str, Any]) -> str:
    """The human-readable report: contenders, end to end, dataset sweep, checks, then targets (or best, last)."""
    cfg, model = report["config"], report["model"]
    hardware = bool(cfg.get("hardware"))
    lines = [f"## gradcam bench: {model['name']} ({model['input_size'][0]}x{model['input_size'][1]}, target layer "
             f"{model['target_layer']})", "", f"Machine: {_machine_line(report)}", ""]
    model_rows = [r for r in report["results"] if r["group"] == "model"]
    ref_n = next((r["images"] for r in model_rows if r["kind"] == REFERENCE), None)
    lines += [f"Contenders on the same {cfg['images']} synthetic images"
              + (f" (the reference on the first {ref_n}, one image per call)" if ref_n else "")
              + f", alternated over {cfg['reps']} timed rounds after a warm-up. img/s: median (min–max); latency: "
              "per batch; peak RSS: a fresh process that imports the runtime, loads only this contender and runs "
              "one batch (the largest; the reference: one image)."
              + (f" `methods`: the same model exported with {', '.join(model.get('methods', []))} (one graph)."
                 if any(r["kind"] == METHODS for r in model_rows) else ""), "",
              "| contender | precision | batch | img/s | latency p50 / p95 ms | peak RSS MB"
              + ("" if hardware else " | vs reference | vs forward-only") + " |",
              "|---|---|---:|---:|---:|---:" + ("" if hardware else "|---:|---:") + "|"]
    for r in sorted(model_rows, key=lambda r: ({REFERENCE: 0, GRADCAM: 1, METHODS: 2, FORWARD: 3}.get(r["kind"], 4),
                                              r["runtime"], r["precision"], r["batch_size"])):
        ratios = "" if hardware else f" | {_ratio(r['vs_reference'])} | {_ratio(r['vs_forward'], '')}"
        lines.append(f"| {r['contender']} | {r['precision']} | {r['batch_size']} | {_ips(r)} | {_latency(r)} | "
                     f"{_memory(r)}{ratios} |")
    e2e = [r for r in report["results"] if r["group"] == "end-to-end"]
    if e2e:
        photo = f"{PHOTO_SIZE[1]}x{PHOTO_SIZE[0]}"
        lines += ["", f"End to end: the same {e2e[0]['images']} JPEG files ({photo}) -> Parquet through run_gradcam, "
                  "vs the same runner on the same images already decoded, same batch, alternated with the above.", "",
                  "| run | runtime | precision | batch | img/s | latency p50 / p95 ms |",
                  "|---|---|---|---:|---:|---:|"]
        for r in e2e:
            lines.append(f"| {r['contender']} | {r['runtime']} | {r['precision']} | {r['batch_size']} | {_ips(r)} | "
                         f"{_latency(r)} |")
    sweep = report.get("dataset_sweep", [])
    if sweep:
        lines += ["", "Dataset-size sweep, end to end, each size in a fresh process (engine only, no TensorFlow):", "",
                  "| images | img/s | wall s (with session load) | peak RSS MB | RSS after imports MB |",
                  "|---:|---:|---:|---:|---:|"]
        for r in sweep:
            lines.append(f"| {r['images']} | {r['images_per_second']:.2f} | {r['wall_seconds']:.1f} | "
                         f"{r['peak_rss_mb']:.0f} | {r['baseline_rss_mb']:.0f} |")
    lines += _gate_lines(report)
    lines += ["", _checks_line(report["checks"])]
    if report["skipped"]:
        lines.append("Skipped: " + "; ".join(f"{s['contender']}: {s['reason']}" for s in report["skipped"]))
    best = best_gradcam(report)
    if hardware:
        if best:
            lines += ["", f"Best configuration: Grad-CAM on {best['runtime']} {best['precision']}, batch "
                      f"{best['batch_size']}: "
                      f"{best['images_per_second']:.2f} img/s, {best['latency_p50_ms']:.0f} ms per batch (p50)."]
        return "\n".join(lines)
    lines += ["", "Targets:"]
    for t in report["targets"]:
        value = "—" if t["measured"] is None else (f"{t['measured']:+.1%}" if "RSS" in t["target"]
                                                  else f"{t['measured']:.2f}" + ("x" if "reference" in t["target"]
                                                                                  else ""))
        lines.append(f"- {_verdict(t['met'])}: {t['target']}: {value} (target {t['goal']}); {t['detail']}")
    return "\n".join(lines)
