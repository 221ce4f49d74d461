"""One compression experiment, tracked: ``run(cfg)`` trains or loads the dense baseline,
prunes, fine-tunes, exports, measures, logs to MLflow and returns the metrics.

The command line (``python -m src.run``) is src/run.py, which imports this module, and so
TensorFlow, only once Hydra has accepted the overrides.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import mlflow
from omegaconf import DictConfig, OmegaConf

from src import (
    baseline,
    data,
    distill,
    measure,
    model_file,
    qat,
    quantize,
    report,
    speed,
    tracking,
    units,
)
from src.checkpoint import EpochCheckpoint
from src.config import Settings, settings_from
from src.keras_env import keras
from src.locks import file_lock
from src.models import build
from src.prune import prune
from src.prune.channel import check_widths
from src.train import evaluate


def run(cfg: DictConfig, callbacks: Sequence[keras.callbacks.Callback] = (),
        extra_tags: dict[str, str] | None = None, nested: bool = False,
        name_prefix: str = "") -> dict[str, float]:
    """Runs one tracked experiment and returns its metrics (see README for their names).

    callbacks go to fine-tuning (the search uses them to report and stop early trials);
    name_prefix goes before the run's name (a search trial's "<study>#<n> ").
    """
    clock = measure.Stopwatch()
    settings = settings_from(cfg)  # bad settings fail here, before data or training
    distill.check_teacher(settings.distill, settings.paths.cache_dir)
    tracking.connect(settings.tracking)  # a store that cannot open fails here, before the data
    keras.backend.clear_session()
    keras.utils.set_random_seed(settings.train.seed)
    # model=file: the loaded model is the baseline (own), and the data fit its input.
    own, dataset, key = model_file.dense_source(settings)
    if settings.prune.widths is not None or settings.quant.qat_epochs:
        # Refused now, not after the baseline's training or the fine-tuning.
        dense = own.model if own else build(settings.model, dataset.num_classes)
        if settings.prune.widths is not None:
            check_widths(dense, settings.prune.widths)
        if settings.quant.qat_epochs:
            qat.quantize_aware(dense)
        # Building a model to check them drew from the seeded RNG: reseed, so a baseline
        # trained next starts from the weights it would without these settings.
        keras.utils.set_random_seed(settings.train.seed)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    resolved.pop("search", None)  # the search that chose these settings is logged by its worker
    resolved["tracking"]["uri"] = tracking.safe_url(resolved["tracking"]["uri"])
    config_yaml = OmegaConf.to_yaml(resolved)
    tags = {
        "git_commit": tracking.git_commit(),
        "config_hash": hashlib.sha256(config_yaml.encode()).hexdigest()[:16],
        "baseline_key": key,
        "data_fingerprint": dataset.fingerprint,
        "prune_method": settings.prune.method,
        "quant_mode": settings.quant.mode,
        "processor": speed.processor(),  # int8 latencies compare only on one kind of CPU
        "host": tracking.HOST,
        **(extra_tags or {}),
    }
    params = tracking.flatten(resolved)
    if "search.objectives" in tags:  # a trial is judged by its study's objectives
        params["objective"] = tags["search.objectives"]
    # Always an explicit name: MLflow's random one comes from the RNG the seed just reset.
    name = name_prefix + (settings.tracking.run_name or report.run_name(settings))
    done = tracking.finished_job(settings.tracking, tags) \
        if "sweep_id" in tags and settings.tracking.continue_interrupted else None
    if done:  # a continued sweep's job that finished before the interruption
        print(f"job {tags.get('sweep_job', '?')}: finished before the sweep was interrupted: "
              "not run again", flush=True)
        print("result: " + report.headline(settings, done.data.metrics, done.info.run_id,
                                           done.data.tags.get("channel_widths")), flush=True)
        return dict(done.data.metrics)
    with tracked(settings, tags, name, nested) as active:
        tracking.log_params(params)
        if own:
            print(f"dense baseline: loaded from {settings.model.path} (key {key})")
        baseline_curves = tracking.EpochCurves("baseline")
        announce = keras.callbacks.LambdaCallback(  # called only when the baseline is trained
            on_train_begin=lambda logs: print(report.baseline_line(settings, key, False)),
            on_epoch_end=baseline_curves.epoch_ended)
        base = own or baseline.load_or_train(key, settings.paths.cache_dir, dataset,
                                             settings.model, settings.train, callbacks=[announce])
        if base.reused and not own:
            print(report.baseline_line(settings, key, True))
        if not base.reused:
            clock.add("train", base.train_seconds)
            clock.add("evaluate", base.evaluate_seconds)
        tracking.set_tags({"baseline_reused": base.reused})
        if base.resumed_from_epoch:
            tracking.set_tags({"resumed_from_epoch": base.resumed_from_epoch})
        baseline_curves.finish(base.history)
        teacher = distill.teacher_for(settings.distill, base.model, base.test_accuracy,
                                      settings.paths.cache_dir, dataset.x_test, dataset.y_test,
                                      settings.model.trust_code, settings.model.custom_objects,
                                      ) if settings.prune.finetune_epochs or \
            settings.quant.qat_epochs else None
        finetune_curves = tracking.EpochCurves("finetune")
        live = keras.callbacks.LambdaCallback(on_epoch_end=finetune_curves.epoch_ended)
        # None when fine-tuning is off, or another process fine-tunes the same settings now
        with finetune_checkpoint(settings, key) as checkpoint, \
                qat_checkpoint(settings, key) as qat_checkpointed:
            with clock("train"):  # masks or tfmot wrappers, and fine-tuning when configured
                try:
                    result = prune(base.model, settings.prune, dataset, settings.train,
                                   [live, *callbacks], distill=teacher, checkpoint=checkpoint)
                except tracking.StoppedEarly:  # a stopped trial will not be resumed
                    if checkpoint:
                        checkpoint.remove()
                    raise
            if checkpoint and checkpoint.resumed_from_epoch:
                tracking.set_tags({"finetune_resumed_from_epoch": checkpoint.resumed_from_epoch})
            finetune_curves.finish(result.history)
            # The schedule in steps, as tfmot ran it (frequency may be clamped to the steps
            # there are).
            tracking.log_params({f"prune_steps.{k}": v for k, v in result.schedule_steps.items()})
            if result.tags:  # e.g. the widths a channel cut kept
                tracking.set_tags(result.tags)
            aware = quantization_aware(result.model, settings, dataset, teacher,
                                       qat_checkpointed, clock) \
                if settings.quant.qat_epochs else None
            out_dir = Path(settings.paths.output_dir) / "exports" / active.info.run_id
            metrics, files = export_and_measure(result.model, settings, dataset, out_dir, clock,
                                                aware)
            (out_dir / "config.yaml").write_text(config_yaml)
            for file_name, text in result.artifacts.items():  # e.g. the channel table
                (out_dir / file_name).write_text(text)
                files.append(out_dir / file_name)
            metrics["baseline_test_accuracy"] = base.test_accuracy
            metrics["baseline_params"] = speed.params(base.model)
            if teacher:
                metrics["teacher_test_accuracy"] = teacher.test_accuracy
            metrics.update({f"{phase}_seconds": seconds
                            for phase, seconds in clock.totals().items()})
            metrics.update(report.size_metrics(metrics))
            tracking.log_metrics(metrics)
            tracking.log_artifacts([*files, out_dir / "config.yaml"])
            # Only now: an export stopped or failed resumes after the last epoch.
            for finished in (checkpoint, qat_checkpointed):
                if finished:
                    finished.remove()
            widths = result.tags.get("channel_widths")
            tracking.set_tags({"mlflow.note.content": report.headline(settings, metrics,
                                                                      widths=widths)})
    print("result: " + report.headline(settings, metrics, active.info.run_id, widths), flush=True)
    return metrics


def quantization_aware(model: keras.Model, settings: Settings, dataset: data.Dataset,
                       teacher: distill.Distillation | None,
                       checkpoint: EpochCheckpoint | None,
                       clock: measure.Stopwatch) -> keras.Model:
    """Returns the fake-quantized model trained quant.qat_epochs from model (which gets the
    trained float weights), its curves logged as qat_* and a resume tagged."""
    curves = tracking.EpochCurves("qat")
    live = keras.callbacks.LambdaCallback(on_epoch_end=curves.epoch_ended)
    with clock("train"):
        aware, history = qat.fine_tune(model, settings, dataset, [live], teacher, checkpoint)
    if checkpoint and checkpoint.resumed_from_epoch:
        tracking.set_tags({"qat_resumed_from_epoch": checkpoint.resumed_from_epoch})
    curves.finish(history)
    return aware


@contextlib.contextmanager
def tracked(settings: Settings, tags: dict[str, str], name: str,
            nested: bool) -> Iterator[mlflow.ActiveRun]:
    """Yields the experiment's MLflow run: a new one, or the run that the same command left
    unfinished (tracking.continue_interrupted; see tracking.unfinished_run), so that a resumed
    training goes on in the run that started it.

    Every process with these settings holds a shared lock on <hash>.live while its run is
    active, released only after the run has ended: a RUNNING run is taken for dead only when
    nobody holds it. Choosing and starting are one step at a time (<hash>.lock). A sweep's
    job continues only a run of its own sweep (a continued sweep, see
    sweep_callback.SweepRun); a search's trials always get new runs.
    """
    if (nested and "sweep_id" not in tags) or not settings.tracking.continue_interrupted:
        with tracking.tracked_run(settings.tracking, tags, run_name=name,
                                  nested=nested) as active:
            yield active
        return
    locks = Path(settings.paths.cache_dir) / "runs" / tags["config_hash"]
    with contextlib.ExitStack() as stack:
        live = stack.enter_context(contextlib.ExitStack())  # exits after the run has ended
        with file_lock(locks.with_suffix(".lock")):
            with file_lock(locks.with_suffix(".live"), wait=False) as nobody_running:
                pass
            left, dead = tracking.unfinished_run(settings.tracking, tags, not nobody_running)
            if left:
                print(f"continuing MLflow run {left.info.run_id} ({left.info.run_name}), "
                      + ("interrupted" if left.info.status == "KILLED" else
                         "left RUNNING by a process that is gone"), flush=True)
            active = stack.enter_context(tracking.tracked_run(
                settings.tracking, tags, run_name=name, nested=nested, continuing=left))
            if dead:  # e.g. killed under another commit: closed, not continued
                tracking.close_run(dead, f"its process is gone; run {active.info.run_id} "
                                         "has the same settings (another commit, data or "
                                         "baseline)")
            live.enter_context(file_lock(locks.with_suffix(".live"), shared=True))
        yield active


@contextlib.contextmanager
def finetune_checkpoint(settings: Settings, base_key: str) -> Iterator[EpochCheckpoint | None]:
    """Yields the resumable checkpoint of this run's fine-tuning, or None without one.

    It is keyed by the dense model and the settings that shape the fine-tuned weights, so
    the same command run again after an interruption resumes from the last saved epoch. Jobs
    that differ only in what the key leaves out (e.g. quant, in a parallel sweep) would write
    one folder at once: the first holds its lock, the others fine-tune without a checkpoint.
    """
    if settings.prune.method == "none" or not settings.prune.finetune_epochs:
        yield None
        return
    key = baseline.finetune_key(base_key, settings.prune, settings.train, settings.distill)
    with _held_checkpoint(settings, key, "is fine-tuning", "fine-tunes") as checkpoint:
        yield checkpoint


@contextlib.contextmanager
def qat_checkpoint(settings: Settings, base_key: str) -> Iterator[EpochCheckpoint | None]:
    """Yields the resumable checkpoint of this run's quantization-aware training, or None
    without one: keyed like finetune_checkpoint's and by the quant.qat settings."""
    if not settings.quant.qat_epochs:
        yield None
        return
    tuned = baseline.finetune_key(base_key, settings.prune, settings.train, settings.distill)
    key = "qat-" + baseline.content_key({"finetune": tuned, "epochs": settings.quant.qat_epochs,
                                         "lr": settings.quant.qat_lr,
                                         "version": qat.QAT_VERSION})
    with _held_checkpoint(settings, key, "trains quantization-aware",
                          "trains quantization-aware") as checkpoint:
        yield checkpoint


@contextlib.contextmanager
def _held_checkpoint(settings: Settings, key: str, doing: str,
                     does: str) -> Iterator[EpochCheckpoint | None]:
    """Yields the checkpoint folder's EpochCheckpoint while this process holds its lock, or
    None (saying so) while another process trains with it."""
    folder = baseline.finetune_checkpoint_dir(settings.paths.cache_dir, key)
    with file_lock(folder.with_suffix(".lock"), wait=False) as held:
        if not held:
            print(f"note: another process {doing} these settings now; this run {does} "
                  "without a resumable checkpoint", flush=True)
        yield EpochCheckpoint(folder, settings.train.checkpoint_every) if held else None


def export_and_measure(model: keras.Model, settings: Settings, dataset: data.Dataset,
                       out_dir: Path, clock: measure.Stopwatch,
                       aware: keras.Model | None = None,
                       ) -> tuple[dict[str, float], list[Path]]:
    """Returns the accuracy, sparsity and size metrics, and the files to upload.

    With aware (model trained quantization-aware, src/qat.py) the .tflite is converted from it,
    with its trained ranges; the Keras file and test_accuracy are the plain model's.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    keras_file, tflite_file = out_dir / "model.h5", out_dir / "model.tflite"
    table = out_dir / "sparsity_per_layer.csv"
    with clock("evaluate"):
        test_accuracy = evaluate(model, dataset.x_test, dataset.y_test)
    with clock("export"):
        pruned_types = settings.prune.layer_types if settings.prune.method != "none" \
            else tuple(measure.KERNEL_ATTRIBUTE)
        rows = measure.layer_sparsity(model, pruned_types)
        table.write_text(measure.sparsity_table(rows))
        model.save(keras_file, include_optimizer=False)
        flatbuffer = quantize.to_tflite(model if aware is None else aware, settings.quant,
                                        dataset.x_train)
        tflite_file.write_bytes(flatbuffer)
        sizes = {
            "model_bytes": keras_file.stat().st_size,
            "model_zip_bytes": units.zipped_size(keras_file.read_bytes(), keras_file.name),
            "tflite_bytes": tflite_file.stat().st_size,
            "tflite_zip_bytes": units.zipped_size(flatbuffer, tflite_file.name),
        }
        sparsity = {
            "sparsity_global": measure.global_sparsity(rows),
            "sparsity_all_params": measure.parameter_sparsity(model),
            "tflite_sparsity": measure.tflite_weight_sparsity(flatbuffer),
        }
    with clock("evaluate"):
        tflite_accuracy = quantize.evaluate_tflite(flatbuffer, dataset.x_test, dataset.y_test)
        m = settings.measure
        latency = speed.tflite_latency(flatbuffer, m.latency_threads, m.latency_warmup,
                                       m.latency_runs, m.latency_repeats, m.latency_kernels)
    metrics = {
        "test_accuracy": test_accuracy,
        "tflite_accuracy": tflite_accuracy,
        **sparsity,
        **sizes,
        "accuracy_per_mb": tflite_accuracy / (sizes["tflite_zip_bytes"] / units.MB),
        "tflite_latency_ms": latency.median_ms,
        "tflite_latency_p90_ms": latency.p90_ms,
        "macs": speed.tflite_macs(flatbuffer),
        "params": speed.params(model),
    }
    if aware is not None:
        with clock("evaluate"):  # the fake-quantized model, as trained
            metrics["qat_test_accuracy"] = evaluate(aware, dataset.x_test, dataset.y_test)
    # The Keras file too: a pruned model that can be fine-tuned further or pruned again
    # (model=file model.path=<it>), as the .tflite cannot.
    return metrics, [tflite_file, keras_file, table]
