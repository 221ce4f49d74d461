"""Collects finished runs of MLflow experiments into the results table.

    python -m results.collect --experiment reference --experiment frontier

Writes results/table.json (one row per run: metrics, the exact command, the resolved config),
results/README.md (the table, the reference comparison, the frontier targets, the commands)
and results/oneshot.png (the reference study's figure: accuracy vs rate, flat vs layer).
Each row keeps what `python -m results.check` needs to re-evaluate it:
- its exported .tflite file, copied to results/models/ when at most --max-model-bytes;
- otherwise, for one-shot rows (no fine-tuning), the dense baseline they were pruned from
  (one .h5 file per baseline): the check prunes it again and evaluates the Keras model.
Rows that are neither are listed as not re-evaluable.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import tempfile
from pathlib import Path

import matplotlib
import mlflow
import yaml
from matplotlib.figure import Figure

from src.config import PROJECT_ROOT, DistillConfig, widths_text
from src.config import result_settings as shaping_settings
from src.report import STORED_BASELINE, short_model_name, stored_baseline_name
from src.tracking import flatten
from src.units import KB, MB

RESULTS = PROJECT_ROOT / "results"
METRICS = ["baseline_test_accuracy", "test_accuracy", "tflite_accuracy", "sparsity_global",
           "tflite_sparsity", "model_bytes", "model_zip_bytes", "tflite_bytes",
           "tflite_zip_bytes", "accuracy_per_mb", "train_seconds", "macs", "params",
           "tflite_latency_ms", "teacher_test_accuracy", "qat_test_accuracy"]
# A run tag saying what else ran on the machine while it was timed (set by whoever ran it).
SHARED_TAG = "shared_machine"
MIB = 1024 * 1024  # the reference study's "MB" (see reference_section)

# The reference study's published numbers (stock MobileNetV2, CIFAR-10), which the table beats.
REFERENCE = {"dense": 0.67, "tfmot": 0.65, "int8": 0.63, "model_mb": 9.15, "zipped_mb": 2.16,
             "quantized_mb": 0.56}
# The frontier targets: int8 TFLite test accuracy at no more than this many zipped bytes.
FRONTIER = [(64 * KB, 0.85), (256 * KB, 0.88)]
# ... and at no more raw .tflite bytes than the MLPerf Tiny reference ResNet-8 (about 99 KB), more
# accurate than its int8 accuracy.
MLPERF_RAW = (99 * KB, 0.861)
# Channel pruning's target: int8 accuracy at no more than this many raw .tflite bytes, this many
# times faster than the dense int8 model measured beside it.
CHANNEL_TARGET = {"accuracy": 0.84, "raw_bytes": 64 * KB, "speedup": 1.5}
# The experiments whose rows the channel section times side by side (their dense row included).
CHANNEL_EXPERIMENTS = ("channel", "channel_long")
# The experiment holding the small three-objective study on real data (search=device), and the
# folder with its study summary and plots (python -m src.summary study device --out ...).
DEVICE_EXPERIMENT, DEVICE_FOLDER = "device", "device"


def row_name(config: dict) -> str:
    """Returns a short file-safe name: model, width, pruning, rate (or the channels kept per
    group, 'w8-8-16-16-64-48'), fine-tuning, weight averaging ('swa'), quantization-aware
    training ('qat10'), quantization."""
    model, prune = config["model"], config["prune"]
    parts = [model["name"]]
    if float(model.get("alpha", 1.0)) != 1.0:
        parts.append(f"a{float(model['alpha']):g}")
    parts.append(prune["method"])
    rate = (0.5 if prune.get("structured_2_4") else prune.get("final_sparsity")) \
        if prune["method"] == "tfmot" else prune.get("rate")
    if prune.get("widths"):  # channels kept per group instead of a rate
        parts.append("w" + widths_text(prune["widths"]))
    elif rate is not None:
        parts.append(f"{float(rate):.2f}")
    if prune.get("finetune_epochs"):
        parts.append(f"ft{prune['finetune_epochs']}")
        if config.get("train", {}).get("swa_start") is not None:  # as report.method_label
            parts.append("swa")
    if config["quant"].get("qat_epochs"):  # as report.quant_label
        parts.append(f"qat{config['quant']['qat_epochs']}")
    parts.append(config["quant"]["mode"])
    return "-".join(parts)


class CollectError(Exception):
    """A run or experiment that cannot be collected; the message names it."""


def result_settings(config: dict) -> dict[str, str]:
    """Returns the config's settings that shape the result, flattened to dotted keys."""
    return {key: json.dumps(value, sort_keys=True)
            for key, value in shaping_settings(flatten(config)).items()}


def unique_names(settings: list[dict[str, str]], base: list[str]) -> list[str]:
    """Returns the base names, each one that several different configs share made unique by
    adding the settings in which they differ (e.g. ``-prune.finetune_lr=0.001``)."""
    names = []
    for mine, name in zip(settings, base):
        group = [other for other, same in zip(settings, base) if same == name]
        differing = sorted({k for other in group for k in {*mine, *other}
                            if other.get(k) != mine.get(k)})
        suffix = [f"{k}={json.loads(mine[k]) if k in mine else '-'}" for k in differing]
        names.append("-".join([name, *(re.sub(r"[^A-Za-z0-9._=+-]", "_", s) for s in suffix)]))
    return names


def collect(experiments: list[str], uri: str, results: Path,
            max_model_bytes: int, kept_rows: list[dict] = ()) -> list[dict]:
    """Returns one row per distinct config of the experiments' finished runs, and replaces
    results/models/ with the files that re-evaluate them once every row has been read.

    Artifacts are read through MLflow's artifact API, so a tracking server with proxied
    artifacts and runs logged from other machines are read like a local store. Runs with
    identical result settings are merged: the newest is kept and the others are listed in
    its row's ``merged_runs`` (and printed). kept_rows: rows already in the table that stay with
    their files (their MLflow runs may live on another machine) unless a run read now replaces
    them (``_with_kept``)."""
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient(tracking_uri=uri)
    found = {}
    for experiment in experiments:
        found[experiment] = mlflow.search_runs(experiment_names=[experiment],
                                               output_format="list",
                                               filter_string="attributes.status = 'FINISHED'",
                                               order_by=["attributes.start_time DESC"])
        if not found[experiment]:
            raise CollectError(f"--experiment {experiment}: no finished runs at {uri}")
    with tempfile.TemporaryDirectory(prefix="collect-") as scratch:
        staging = Path(scratch)
        rows, settings = [], []
        for experiment, runs in found.items():
            for run in runs:  # newest first, so the newest of identical configs is kept
                if "tflite_bytes" not in run.data.metrics:
                    continue  # summaries and search parents, not experiments
                config = _read_config(client, run, experiment, staging)
                mine = {"experiment": experiment, **result_settings(config)}
                if mine in settings:
                    kept = rows[settings.index(mine)]
                    kept["merged_runs"].append(run.info.run_id)
                    print(f"note: {experiment} run {run.info.run_id} has the same settings as "
                          f"the newer run {kept['run_id']}; kept the newer one")
                    continue
                settings.append(mine)
                rows.append({"name": row_name(config), "experiment": experiment,
                             "run_id": run.info.run_id,
                             "command": run.data.tags.get("command", ""),
                             **{k: run.data.metrics.get(k) for k in METRICS},
                             "config": config, "check": None, "file": None,
                             "merged_runs": [], "baseline_key": run.data.tags.get("baseline_key"),
                             "shared_machine": run.data.tags.get(SHARED_TAG),
                             "start_time": run.info.start_time, "end_time": run.info.end_time})
        names = unique_names(settings, [f"{r['experiment']}/{r['name']}" for r in rows])
        for row, name in zip(rows, names):
            row["name"] = name.split("/", 1)[1]
        kept_rows = _with_kept(kept_rows, rows, settings, client, experiments)
        for row in rows:
            _attach_check(row, client, staging, results, max_model_bytes)
        for row in kept_rows:
            if row["file"] and not (staging / row["file"]).exists():
                shutil.copyfile(results / row["file"], _mkdir(staging / "models") /
                                Path(row["file"]).name)
        for row in [*rows, *kept_rows]:  # committed model files that rows start from stay
            for source in committed_sources(row["config"], results):
                target = _mkdir(staging / "models") / source.name
                if not target.exists():
                    shutil.copyfile(source, target)
        # Every row is read: only now are the old files replaced by the current rows'.
        shutil.rmtree(results / "models", ignore_errors=True)
        if (staging / "models").exists():
            shutil.copytree(staging / "models", results / "models")
    for row in rows:
        del row["baseline_key"]
    return sorted([*rows, *kept_rows], key=lambda r: (r["experiment"], r["name"]))


def _with_kept(kept_rows: list[dict], rows: list[dict], settings: list[dict],
               client: mlflow.MlflowClient, experiments: list[str]) -> list[dict]:
    """Returns the kept rows that stay beside the rows read now (and drops a read row that a
    newer kept one replaces). A kept row goes when its run was read now, or when this store
    holds its run in a collected experiment without it being read (deleted or failed since).
    Of a kept row and a read one with the same settings the newer run stays, the other listed
    in its merged_runs. A kept row with other settings than a read row of its name is refused:
    one would overwrite the other."""
    read = {run for row in rows for run in (row["run_id"], *row["merged_runs"])}
    staying = []
    for row in kept_rows:
        if row["run_id"] in read or (row["experiment"] in experiments
                                     and _held(client, row["run_id"])):
            continue
        mine = {"experiment": row["experiment"], **result_settings(row["config"])}
        if mine not in settings:
            staying.append(row)
            continue
        index = settings.index(mine)
        new = rows[index]
        if (row.get("start_time") or 0) > (new["start_time"] or 0):
            older = new
            staying.append({**row, "merged_runs": [*row.get("merged_runs", []),
                                                   new["run_id"], *new["merged_runs"]]})
            del rows[index], settings[index]
        else:
            older = row
            new["merged_runs"].append(row["run_id"])
        print(f"note: {row['experiment']}/{row['name']}: run {older['run_id']} has the same "
              "settings as a newer run; kept the newer one")
    names = {(row["experiment"], row["name"]) for row in rows}
    for row in staying:
        if (row["experiment"], row["name"]) in names:
            raise CollectError(f"{row['experiment']}/{row['name']}: a row of the table and a run "
                               "read now have different settings but one name; give the run "
                               "another tracking.experiment, or remove the row from table.json")
    return staying


def _held(client: mlflow.MlflowClient, run_id: str) -> bool:
    """Returns whether this store holds the run (in any state, deleted ones too)."""
    try:
        client.get_run(run_id)
    except mlflow.exceptions.MlflowException:
        return False
    return True


def _read_config(client: mlflow.MlflowClient, run: mlflow.entities.Run, experiment: str,
                 staging: Path) -> dict:
    """Returns the run's logged config.yaml, or raises CollectError naming the run."""
    run_id = run.info.run_id
    if "config.yaml" not in {a.path for a in client.list_artifacts(run_id)}:
        raise CollectError(f"run {run_id} ({run.info.run_name}) in experiment {experiment}: "
                           f"has metrics but no config.yaml artifact at {run.info.artifact_uri}")
    path = client.download_artifacts(run_id, "config.yaml", str(_mkdir(staging / run_id)))
    return yaml.safe_load(Path(path).read_text())


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def committed_sources(config: dict, results: Path) -> list[Path]:
    """Returns the files in results/models/ a row starts from: the model file it loaded
    (model=file) and its distillation teacher, named by path or by its cached baseline key."""
    models = (results / "models").resolve()
    paths = [Path(config["model"]["path"])] if config["model"]["name"] == "file" else []
    for teacher in DistillConfig(teacher=(config.get("distill") or {}).get("teacher")).teachers:
        paths.append(Path(teacher))
        paths += [f for f in models.glob("*.h5")
                  if (stored := STORED_BASELINE.fullmatch(f.stem)) and stored["key"] == teacher]
    paths = [p if p.is_absolute() else PROJECT_ROOT / p for p in paths]
    return [p for p in paths if p.parent.resolve() == models and p.exists()]


def _attach_check(row: dict, client: mlflow.MlflowClient, staging: Path, results: Path,
                  max_model_bytes: int) -> None:
    """Stages what re-evaluates the row under staging/models/ and names it in the row."""
    models = _mkdir(staging / "models")
    if row["tflite_bytes"] <= max_model_bytes:
        target = models / f"{row['experiment']}-{row['name']}.tflite"
        try:
            downloaded = client.download_artifacts(row["run_id"], "model.tflite",
                                                   str(_mkdir(staging / row["run_id"])))
        except (mlflow.exceptions.MlflowException, OSError) as error:
            raise CollectError(f"run {row['run_id']} ({row['experiment']} / {row['name']}): "
                               f"cannot read its model.tflite artifact: {error}") from None
        shutil.copyfile(downloaded, target)
        row["check"], row["file"] = "tflite", f"models/{target.name}"
        return
    prune, key, model = row["config"]["prune"], row["baseline_key"], row["config"]["model"]
    if model["name"] == "file":  # the dense baseline is the model file the run loaded
        source = Path(model["path"])
        source = source if source.is_absolute() else PROJECT_ROOT / source
        name, sources = source.name, [source]
    else:
        name = stored_baseline_name(model["name"], key)
        # The dense baseline is not an artifact: it is in this machine's cache, or committed.
        sources = [Path(row["config"]["paths"]["cache_dir"]) / "baselines" / str(key) /
                   "model.h5", results / "models" / name]
    target = models / name
    source = next((s for s in sources if s.exists()), None)
    trained = prune.get("finetune_epochs") or row["config"]["quant"].get("qat_epochs")
    if prune["method"] in ("none", "flat", "layer") and not trained and source is not None:
        if not target.exists():
            shutil.copyfile(source, target)
        row["check"], row["file"] = "keras_oneshot", f"models/{name}"


HEADER = """# Results

Written by `python -m results.collect {args}` from the MLflow runs: every number
below was measured by the run named in its row, on **CIFAR-10 as the JPEG quality-75 copy**
(`../shared/datasets/cifar10-jpg.tar.gz`), 45,000 training images (5,000 more held out for
validation{full_train}) and the whole 10,000-image test split. JPEG q75 loses detail, so
these accuracies are a little below what the same recipes reach on the original PNG-exact CIFAR-10.

`python -m results.check` re-evaluates every row on the test split and compares it with this
table (within 0.3 points): rows whose TFLite file is small are committed as `models/*.tflite`
and run with LiteRT; the float32 one-shot rows of the reference sweep (9 MB each) are checked
from their one committed dense baseline (`models/*-dense-*.h5`), pruned again the same way.

Sizes are bytes / 1,000,000 (MB) or / 1,000 (KB), so the 64 KB limit is 64,000 bytes;
"zipped" is the file deflated in a zip archive, as the reference study measured it.
"Keras acc" is the pruned float model, "TFLite acc" the exported file (int8 where the row says so).

"""


def render(rows: list[dict], args: str, results: Path = RESULTS) -> str:
    """Returns results/README.md (the channel rows' files are read from results)."""
    full = [_key(r) for r in rows if r["config"]["data"].get("val_fraction") == 0]
    full_train = ("; all 50,000, `data.val_fraction=0.0`, in " + ", ".join(full)) if full else ""
    parts = [HEADER.format(args=args, full_train=full_train), reference_section(rows),
             oneshot_section(rows),
             model_file_section(rows), channel_section(rows, results), device_section(rows),
             frontier_section(rows),
             table_section(rows), commands_section(rows)]
    return "\n".join(p for p in parts if p)


def reference_section(rows: list[dict]) -> str:
    """Returns the comparison with the reference study's numbers (stock MobileNetV2 rows)."""
    stock = [r for r in rows if r["config"]["model"]["name"] == "mobilenetv2"]
    dense = next((r for r in stock if r["config"]["prune"]["method"] == "none"
                  and r["config"]["quant"]["mode"] == "none"), None)
    tfmot_int8 = sorted((r for r in stock if r["config"]["prune"]["method"] == "tfmot"
                         and r["config"]["quant"]["mode"] == "int8"),
                        key=lambda r: r["config"]["prune"].get("final_sparsity") or 0)
    # The reference's tfmot row: 50% -> 90%, int8; the most accurate when several recipes ran.
    tfmot = max((r for r in tfmot_int8 if r["config"]["prune"].get("final_sparsity") == 0.9
                 and not r["config"]["prune"].get("structured_2_4")),
                key=lambda r: r["tflite_accuracy"], default=None)
    if not (dense and tfmot):
        return ""
    lines = ["## Against the reference study (stock Keras MobileNetV2)\n",
             f"Sizes here in MiB (2^20 bytes): the reference's {REFERENCE['model_mb']} MB dense "
             "model is the same architecture as ours, whose .h5 file is "
             f"{dense['model_bytes'] / MIB:.2f} MiB = {dense['model_bytes'] / MB:.2f} MB, so "
             "the reference counted MiB.\n",
             "| what | reference | here | better | row |", "|---|---|---|---|---|"]

    def add(what: str, reference: float, ours: float, accuracy: bool, row: dict) -> None:
        better = ours > reference if accuracy else ours < reference
        shown = [f"{v:.2%}" if accuracy else f"{v:.2f} MiB" for v in (reference, ours)]
        lines.append(f"| {what} | {shown[0]} | {shown[1]} | {'yes' if better else 'no'} | "
                     f"{row['name']} |")

    add("dense test accuracy", REFERENCE["dense"], dense["test_accuracy"], True, dense)
    add("tfmot 50% -> 90% sparsity, Keras accuracy", REFERENCE["tfmot"],
        tfmot["test_accuracy"], True, tfmot)
    add("same, after int8 TFLite quantization", REFERENCE["int8"], tfmot["tflite_accuracy"],
        True, tfmot)
    add("model size (dense .h5)", REFERENCE["model_mb"], dense["model_bytes"] / MIB, False, dense)
    add("pruned model, zipped (.h5, 90% tfmot)", REFERENCE["zipped_mb"],
        tfmot["model_zip_bytes"] / MIB, False, tfmot)
    add("quantized (int8 TFLite, 90% tfmot, zipped)", REFERENCE["quantized_mb"],
        tfmot["tflite_zip_bytes"] / MIB, False, tfmot)
    lines += ["", "Every tfmot int8 row against the reference's 90% row (65% Keras, 63% int8, "
              f"{REFERENCE['zipped_mb']} MiB zipped model, {REFERENCE['quantized_mb']} MiB "
              "zipped int8 TFLite):\n",
              "| row | final sparsity | fine-tuning epochs | Keras acc | int8 acc | zipped .h5 MiB "
              "| zipped TFLite MiB | better on all four |", "|---|---|---|---|---|---|---|---|"]
    for r in tfmot_int8:
        prune = r["config"]["prune"]
        wins = (r["test_accuracy"] > REFERENCE["tfmot"], r["tflite_accuracy"] > REFERENCE["int8"],
                r["model_zip_bytes"] / MIB < REFERENCE["zipped_mb"],
                r["tflite_zip_bytes"] / MIB < REFERENCE["quantized_mb"])
        lines.append(f"| {r['name']} | {prune.get('final_sparsity')} | "
                     f"{prune.get('finetune_epochs')} | {r['test_accuracy']:.2%} | "
                     f"{r['tflite_accuracy']:.2%} | {r['model_zip_bytes'] / MIB:.2f} | "
                     f"{r['tflite_zip_bytes'] / MIB:.3f} | {'yes' if all(wins) else 'no'} |")
    return "\n".join(lines) + "\n"


def oneshot_rows(rows: list[dict]) -> dict[tuple[str, str, float], dict]:
    """Returns the reference figure's rows (float, flat or layer, no fine-tuning, one rate for
    every layer) by (model, method, rate); a model file is named by its file
    ('mobilenetv2@ff0d8b'), so rows of two files never land in one cell."""
    found = {}
    for row in rows:
        prune = row["config"]["prune"]
        if prune["method"] in ("flat", "layer") and not prune.get("finetune_epochs") \
                and row["config"]["quant"]["mode"] == "none" \
                and not prune.get("min_density") and not prune.get("rates_from"):
            found[model_label(row), prune["method"], prune["rate"]] = row
    return found


def model_label(row: dict) -> str:
    """Returns the row's model as the reports name it: 'resnet8', 'resnet8x1.5', or for a model
    file its file ('resnet8@7c1f1c' for a stored baseline)."""
    model = row["config"]["model"]
    path = model.get("path") if model["name"] == "file" else None
    return short_model_name(model["name"], path, float(model.get("alpha") or 1.0))


def oneshot_section(rows: list[dict]) -> str:
    """Returns the reference figure as a table: one-shot Keras accuracy by rate, flat vs layer."""
    oneshot = oneshot_rows(rows)
    if not oneshot:
        return ""
    models = sorted({m for m, _, _ in oneshot})
    rates = sorted({r for _, _, r in oneshot})
    lines = ["## One-shot pruning without retraining: flat vs layer (the reference figure)\n",
             "Keras test accuracy right after pruning, no fine-tuning. Plot: `oneshot.png`.\n",
             "| rate | " + " | ".join(f"{m} {k}" for m in models for k in ("flat", "layer")) + " |",
             "|---|" + "---|" * (2 * len(models))]
    for rate in rates:
        cells = []
        for model in models:
            for method in ("flat", "layer"):
                row = oneshot.get((model, method, rate))
                cells.append(f"{row['test_accuracy']:.4f}" if row else "-")
        lines.append(f"| {rate:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def oneshot_plot(rows: list[dict], path: Path) -> bool:
    """Writes the accuracy-vs-rate figure of the one-shot rows; False when there are none."""
    oneshot = oneshot_rows(rows)
    if not oneshot:
        return False
    figure = Figure(figsize=(6, 4))
    axes = figure.add_subplot()
    for model, method in sorted({(m, k) for m, k, _ in oneshot}):
        points = sorted((rate, row["test_accuracy"]) for (m, k, rate), row in oneshot.items()
                        if (m, k) == (model, method))
        axes.plot(*zip(*points), marker="o", label=f"{model} {method}")
    axes.set(xlabel="pruning rate (one-shot, no fine-tuning)", ylabel="test accuracy",
             title="CIFAR-10 (JPEG q75): flat vs layer magnitude pruning")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    return True


def model_file_section(rows: list[dict]) -> str:
    """Returns the one-shot rows re-run from a committed dense model file (model=file) beside
    the rows trained and pruned in one go, and the wall time of that sweep."""
    oneshot = oneshot_rows(rows)
    # A stored baseline's rows ('mobilenetv2@ff0d8b') beside its model's trained sweep.
    pairs = [(row, oneshot.get((model.split("@")[0], method, rate)))
             for (model, method, rate), row in sorted(oneshot.items()) if "@" in model]
    pairs = [(mine, theirs) for mine, theirs in pairs if theirs is not None]
    if not pairs:
        return ""
    lines = ["## The one-shot sweep again, from the committed dense model (model=file)\n",
             "Keras test accuracy of each one-shot row pruned from "
             f"`{pairs[0][0]['config']['model']['path']}` with `model=file` (no training), "
             "beside the same row of the sweep that trained that baseline.\n",
             "| method | rate | from the file | trained sweep | difference (points) |",
             "|---|---|---|---|---|"]
    for mine, theirs in pairs:
        prune = mine["config"]["prune"]
        lines.append(f"| {prune['method']} | {prune['rate']:.1f} | {mine['test_accuracy']:.4f} | "
                     f"{theirs['test_accuracy']:.4f} | "
                     f"{(mine['test_accuracy'] - theirs['test_accuracy']) * 100:+.2f} |")
    worst = max(abs(m["test_accuracy"] - t["test_accuracy"]) for m, t in pairs) * 100
    starts = [m["start_time"] for m, _ in pairs if m.get("start_time")]
    ends = [m["end_time"] for m, _ in pairs if m.get("end_time")]
    span = f"{(max(ends) - min(starts)) / 60_000:.1f} minutes" if starts and ends else "unknown"
    lines.append(f"\n{len(pairs)} rows, largest difference {worst:.2f} points; the sweep's wall "
                 f"time, first run's start to last run's end: {span}.")
    return "\n".join(lines) + "\n"


def _key(row: dict) -> str:
    """Returns the row's name with its experiment: names are unique only within one."""
    return f"{row['experiment']}/{row['name']}"


def channel_section(rows: list[dict], results: Path) -> str:
    """Returns the channel-pruning rows beside the dense and magnitude-pruned ones, their
    latencies measured now, side by side and interleaved, from the committed files: with
    XNNPACK (LiteRT's default) and with LiteRT's built-in kernels."""
    chosen = [r for r in rows if r["experiment"] in CHANNEL_EXPERIMENTS and r["check"] == "tflite"]
    dense = next((r for r in chosen if r["config"]["prune"]["method"] == "none"), None)
    if dense is None:
        return ""
    from src import speed  # LiteRT only when there is something to time

    files = {_key(r): (results / r["file"]).read_bytes() for r in chosen}
    speedups = {}  # kernels -> row -> (median ms, speed-up over the dense row)
    for kernels in speed.KERNELS:
        latency = speed.compare_latency(files, threads=1, warmup=50, runs=200, repeats=5,
                                        kernels=kernels)
        base = latency[_key(dense)].median_ms
        speedups[kernels] = {key: (stats.median_ms, base / stats.median_ms)
                             for key, stats in latency.items()}
    header = ("| row | pruned from | dense acc | distill | TFLite acc | raw bytes | zipped bytes "
              "| MACs | params | " + "".join(f"{speed.KERNEL_LABELS[kernels]} ms | speed-up | "
                                              for kernels in speed.KERNELS)).strip()
    lines = ["## Real size and real speed: channel pruning against magnitude pruning (int8)\n",
             "ResNet-8 models pruned from a committed dense file (`model=file`: the file in "
             "`pruned from`, its Keras accuracy in `dense acc`), int8. Magnitude pruning "
             "(flat) zeroes weights: the zip shrinks, the raw `.tflite` a device stores and its "
             "MACs do not. Channel pruning removes filters and rebuilds a smaller dense model. "
             "Latency: LiteRT, batch 1, 1 thread, measured by this command with every row's "
             "file loaded at once and their invokes interleaved (5 rounds of 200 after 50 "
             "warm-up invokes; median of round medians), so all rows share the machine's "
             "state; once with XNNPACK (LiteRT's default) and once with LiteRT's built-in "
             f"kernels (`measure.latency_kernels=builtin`); on {speed.processor()}. Latency "
             "depends on the processor's int8 kernels: compare rows of one table, never "
             "figures from different machines (README: Real size and real speed).\n",
             header, "|---" * (header.count("|") - 1) + "|"]
    for r in sorted(chosen, key=lambda r: -r["tflite_bytes"]):
        distill = r["config"].get("distill", {}).get("alpha", 0.0)
        timed = "".join(f"{speedups[kernels][_key(r)][0]:.4f} | "
                        f"{speedups[kernels][_key(r)][1]:.2f}x | " for kernels in speed.KERNELS)
        lines.append(f"| {r['name']} | {model_label(r)} | {r['baseline_test_accuracy']:.2%} | "
                     f"{distill or '-'} | "
                     f"{r['tflite_accuracy']:.2%} | "
                     f"{r['tflite_bytes']:.0f} | {r['tflite_zip_bytes']:.0f} | "
                     f"{r['macs'] or 0:.0f} | {r['params'] or 0:.0f} | {timed}".rstrip())
    target = CHANNEL_TARGET
    lines.append(f"\nTarget: at least {target['accuracy']:.0%} int8 accuracy with a raw .tflite "
                 f"of at most {target['raw_bytes']:,} bytes, {target['speedup']}x faster than "
                 "the dense row.")
    for kernels in speed.KERNELS:
        fits = [r for r in chosen if r["tflite_bytes"] <= target["raw_bytes"]
                and speedups[kernels][_key(r)][1] >= target["speedup"]]
        best = max(fits, key=lambda r: r["tflite_accuracy"], default=None)
        verdict = "no row fits the size and speed-up" if best is None else (
            f"best fitting row {best['name']}: {best['tflite_accuracy']:.2%} "
            f"({(best['tflite_accuracy'] - target['accuracy']) * 100:+.2f} points against the "
            f"target: {'met' if best['tflite_accuracy'] >= target['accuracy'] else 'not met'})")
        lines.append(f"- {speed.KERNEL_LABELS[kernels]} kernels: {verdict}.")
    return "\n".join(lines) + "\n"


def pareto_rows(rows: list[dict], keys: dict[str, int]) -> list[dict]:
    """Returns the rows no other row beats on every key (sign +1: higher is better)."""
    def beats(a: dict, b: dict) -> bool:
        pairs = [(sign * a[k], sign * b[k]) for k, sign in keys.items()]
        return all(x >= y for x, y in pairs) and any(x > y for x, y in pairs)
    return [r for r in rows if not any(beats(other, r) for other in rows if other is not r)]


def device_section(rows: list[dict]) -> str:
    """Returns the three-objective study's front (accuracy, raw bytes, latency) from its rows."""
    trials = [r for r in rows if r["experiment"] == DEVICE_EXPERIMENT
              and r.get("tflite_latency_ms") is not None]
    if not trials:
        return ""
    keys = {"tflite_accuracy": 1, "tflite_bytes": -1, "tflite_latency_ms": -1}
    front = sorted(pareto_rows(trials, keys), key=lambda r: -r["tflite_accuracy"])
    lines = ["## Search on what the device sees: a three-objective study\n",
             f"The {len(trials)} finished trials of the `{DEVICE_EXPERIMENT}` study "
             "(`conf/search/device.yaml`: TFLite accuracy up, raw `.tflite` bytes down, "
             "latency down); its study summary and plots (accuracy against raw size and "
             f"against latency, front marked) are in [`{DEVICE_FOLDER}/`]({DEVICE_FOLDER}/). "
             "The front below is recomputed from the rows. Latency is each trial's own "
             "measurement (LiteRT, batch 1, 1 thread, median of rounds), taken when the trial "
             "ran, so rows measured minutes apart carry the machine's drift.\n",
             "| row | TFLite acc | raw bytes | zipped bytes | latency ms | MACs |",
             "|---|---|---|---|---|---|"]
    for r in front:
        lines.append(f"| {r['name']} | {r['tflite_accuracy']:.2%} | {r['tflite_bytes']:.0f} | "
                     f"{r['tflite_zip_bytes']:.0f} | {r['tflite_latency_ms']:.4f} | "
                     f"{r['macs'] or 0:.0f} |")
    return "\n".join(lines) + "\n"


def frontier_section(rows: list[dict]) -> str:
    """Returns the frontier targets, the best int8 row under each size limit and the gap."""
    int8 = [r for r in rows if r["config"]["quant"]["mode"] == "int8"]
    if not int8:
        return ""
    lines = ["## Frontier: int8 TFLite accuracy under a size limit\n",
             "| size limit | target | best here | gap (points) | row | its size |",
             "|---|---|---|---|---|---|"]
    limits = [("zipped", "tflite_zip_bytes", limit, target) for limit, target in FRONTIER]
    limits.append(("raw", "tflite_bytes", *MLPERF_RAW))
    for kind, key, limit, target in limits:
        fitting = [r for r in int8 if r[key] <= limit]
        best = max(fitting, key=lambda r: r["tflite_accuracy"], default=None)
        label = f"{limit // KB} KB {kind}"
        if best is None:
            lines.append(f"| {label} | {target:.1%} | none fits | - | - | - |")
            continue
        gap = (best["tflite_accuracy"] - target) * 100
        lines.append(f"| {label} | {target:.1%} | {best['tflite_accuracy']:.2%} | {gap:+.2f} | "
                     f"{best['name']} | {best[key] / KB:.1f} KB |")
    lines.append(f"\nThe {MLPERF_RAW[0] // KB} KB raw row is the MLPerf Tiny reference ResNet-8's "
                 f"size, and its target beats the reference's {MLPERF_RAW[1]:.1%} int8 accuracy "
                 "(200 epochs with Adam). A positive gap means the target is met.")
    return "\n".join(lines) + "\n"


COLUMNS = ["experiment", "row", "Keras acc", "TFLite acc", "sparsity", "model MB", "zipped MB",
           "TFLite KB", "TFLite zipped KB", "train s", "re-evaluated from"]


def table_section(rows: list[dict]) -> str:
    """Returns the table of every row."""
    lines = ["## Every row\n", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        source = {"tflite": "committed .tflite", "keras_oneshot": "dense .h5, re-pruned",
                  None: "not re-evaluable"}[r["check"]]
        lines.append(
            f"| {r['experiment']} | {r['name']} | {r['test_accuracy']:.4f} | "
            f"{r['tflite_accuracy']:.4f} | {r['sparsity_global']:.3f} | "
            f"{r['model_bytes'] / MB:.2f} | {r['model_zip_bytes'] / MB:.2f} | "
            f"{r['tflite_bytes'] / KB:.1f} | {r['tflite_zip_bytes'] / KB:.1f} | "
            f"{r['train_seconds'] or 0:.0f} | {source} |")
    baselines = sorted({(model_label(r), r["baseline_test_accuracy"]) for r in rows})
    lines.append("\nDense baselines (Keras test accuracy): "
                 + ", ".join(f"{m} {a:.4f}" for m, a in baselines)
                 + ". `train s` counts the baseline's training only in the run that trained it.")
    shared = [r for r in rows if r.get("shared_machine")]
    if shared:
        lines.append(f"\nRows whose times shared the machine (the run's `{SHARED_TAG}` tag); "
                     "their accuracies and sizes are unaffected:\n")
        lines += [f"- {_key(r)}: {r['shared_machine']}" for r in shared]
    return "\n".join(lines) + "\n"


def commands_section(rows: list[dict]) -> str:
    """Returns the exact command of every row (its resolved config is in table.json)."""
    lines = ["## Commands\n", "Each row's command, run from the project root; its full resolved "
             "config is in `table.json`.\n"]
    lines += [f"- {r['experiment']} / {r['name']}: `{r['command'] or 'see table.json'}`"
              for r in rows]
    return "\n".join(lines) + "\n"


def main() -> None:
    """Command line: writes table.json, README.md, oneshot.png and models/."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--experiment", action="append",
                        help="MLflow experiment to collect (repeat for several)")
    parser.add_argument("--uri", default=f"sqlite:///{PROJECT_ROOT}/mlruns/mlflow.db")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--max-model-bytes", type=int, default=3_000_000)
    parser.add_argument("--keep", action="store_true",
                        help="keep the table's rows that no run read now replaces (other "
                             "experiments, and runs this store no longer holds)")
    args = parser.parse_args()
    experiments = args.experiment or ["reference"]
    matplotlib.use("Agg")
    kept = []
    if args.keep and (args.out / "table.json").exists():
        kept = json.loads((args.out / "table.json").read_text())
    try:
        rows = collect(experiments, args.uri, args.out, args.max_model_bytes, kept)
    except CollectError as error:
        raise SystemExit(f"error: {error}") from None
    (args.out / "table.json").write_text(json.dumps(rows, indent=1) + "\n")
    command = " ".join(f"--experiment {e}" for e in experiments) + " --keep" * args.keep
    (args.out / "README.md").write_text(render(rows, command, args.out))
    oneshot_plot(rows, args.out / "oneshot.png")
    for row in rows:
        print(f"{row['experiment']:10s} {row['name']:36s} keras {row['test_accuracy']:.4f} "
              f"tflite {row['tflite_accuracy']:.4f} zip {row['tflite_zip_bytes'] / KB:.1f} KB "
              f"check {row['check']}")


if __name__ == "__main__":
    main()
