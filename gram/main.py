"""`python run.py`: config -> data + model -> loss -> trainer -> evaluation, in one process per rank."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.contrib.logging import logging_redirect_tqdm

from gram import distributed as dist
from gram.checkpoint_format import TokenizerNotFoundError, tokenizer_location
from gram.cli import EXIT_USER_ERROR, UserError
from gram.config import (
    DataConfig,
    GramConfig,
    LossConfig,
    ModelConfig,
    to_dataclass,
    typed_section,
    without_pretrained,
)
from gram.data.dataset import Collator, VideoTextDataset
from gram.data.loader import TrainStream
from gram.data.preprocessing import preset_origin, recorded_preset
from gram.data.tokenizer import load_tokenizer
from gram.eval.classification import evaluate_classification
from gram.eval.retrieval import evaluate_retrieval, format_table, warn_if_incomplete
from gram.models.gram_model import GramModel
from gram.pretrained import is_pretrained_name, resolve_model_source
from gram.provenance import file_sha256, provenance, rounded
from gram.train import checkpoint as ckpt
from gram.train import launch, rundir
from gram.train.logger import RunLogger
from gram.train.task import GramTask
from gram.train.trainer import Trainer

log = logging.getLogger("gram")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_deterministic() -> None:
    """Bitwise reproducible runs: one intra-op CPU thread, deterministic GPU kernels (cuBLAS reads its
    workspace setting when it creates its handle, at the first GPU matmul, so setting it here is in time)."""
    torch.set_num_threads(1)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False


def pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("trainer.device=cuda but no CUDA device is visible; use trainer.device=cpu")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device(name)


def prepare_sample_data(cfg: GramConfig) -> None:
    """The embedded default: generate the sample dataset once (rank 0), cached under `data.sample_dir`."""
    if not cfg.data.generate_sample:
        return
    if dist.is_main_process():
        from gram.data.sample import generate_sample_dataset

        generate_sample_dataset(cfg.data.sample_dir, num_train=cfg.data.sample_train_size,
                                num_test=cfg.data.sample_test_size, seed=0, progress=cfg.logger.progress_bar)
    launch.barrier()


def check_vocabulary(model_cfg: ModelConfig, tokenizer) -> None:
    """Every token id must have a word embedding."""
    if len(tokenizer) > model_cfg.text.vocab_size:
        raise ValueError(f"the tokenizer has {len(tokenizer)} entries but model.text.vocab_size is "
                         f"{model_cfg.text.vocab_size}; use the model's own vocabulary (data.tokenizer)")


def build_model(model_cfg: ModelConfig, tokenizer) -> GramModel:
    check_vocabulary(model_cfg, tokenizer)
    model = GramModel(model_cfg)
    model.set_frozen()
    return model


def task_from_checkpoint(folder: Path, tokenizer) -> GramTask:
    """The task (model and loss) a checkpoint folder was trained as, rebuilt from its config.json and loaded
    strictly (the file holds the whole task, so tied weights saved once are restored too)."""
    saved, source = ckpt.read_config(folder), str(folder / ckpt.CONFIG)
    from gram.models.hub import GramPretrained, is_hub_config

    if is_hub_config(saved):  # a hub folder: the bare model (strict), the default loss (unused by evaluation)
        model = GramPretrained.from_pretrained(folder)
        check_vocabulary(model.cfg, tokenizer)
        return GramTask(model, LossConfig())
    model_cfg = without_pretrained(typed_section(ModelConfig, saved.get("model"), source))
    task = GramTask(build_model(model_cfg, tokenizer), typed_section(LossConfig, saved.get("loss"), source))
    ckpt.load_weights(task, folder, strict=True)
    return task


def checkpoint_preset(folder: Path, configured: str) -> str:
    """The preprocessing preset a checkpoint records (``mode=test`` evaluates with it), warning when the config
    asks for another one."""
    saved = ckpt.read_config(folder)
    recorded = recorded_preset(saved)
    if configured != recorded:
        log.warning("data.preprocessing=%s is ignored: the checkpoint is evaluated with the preset it was trained "
                    "with, %r", configured, recorded)
    log.info("preprocessing preset %r (%s)", recorded, preset_origin(saved, folder / ckpt.CONFIG))
    return recorded


# Data settings a checkpoint's weights were trained for: in mode=test they come from the checkpoint, whatever the
# command line's data config says (the vocabulary, and the input sizes the encoders expect).
MODEL_BOUND_DATA_KEYS = ("image_size", "audio_mel_bins", "audio_target_length")


def data_bound_to_checkpoint(data: DataConfig, folder: Path) -> DataConfig:
    """``data`` with the checkpoint's vocabulary (inside its folder) and :data:`MODEL_BOUND_DATA_KEYS`."""
    saved = ckpt.read_config(folder)
    changes: dict[str, Any] = {k: v for k, v in (saved.get("data") or {}).items() if k in MODEL_BOUND_DATA_KEYS}
    vision = (saved.get("model") or {}).get("vision") or {}
    if "image_size" not in changes and "image_size" in vision:
        changes["image_size"] = vision["image_size"]
    vocab = checkpoint_vocabulary(folder)
    if vocab is not None:
        changes["tokenizer"] = vocab
    differ = {k: (getattr(data, k), v) for k, v in changes.items() if getattr(data, k) != v}
    if differ:
        log.info("from the checkpoint %s: %s", folder, ", ".join(f"data.{k}={v!r} (not {old!r})"
                                                                  for k, (old, v) in differ.items()))
    return dataclasses.replace(data, **changes)


def checkpoint_vocabulary(folder: Path) -> str | None:
    """The vocabulary a checkpoint carries (or names), or None when it cannot be found."""
    try:
        return str(tokenizer_location(folder))
    except TokenizerNotFoundError as err:
        log.warning("%s; using data.tokenizer instead", err)
        return None


def load_init_weights(task: GramTask, path: str | Path) -> Path:
    """``init_from``: a checkpoint's weights, strictly, except that frame embeddings trained for another number of
    frames or audio clips are resampled (nearest) to this model's, as the reference's ``modify_checkpoint`` does
    (the released pretrained models have 2 frames, the finetuning experiments 8)."""
    from safetensors.torch import load_file

    from gram.models.convert import resize_frames
    from gram.models.hub import check_state

    folder = ckpt.resolve_checkpoint(path)
    state = load_file(str(folder / ckpt.WEIGHTS))
    own = task.state_dict()
    for key, value in state.items():
        if key.startswith("model.frame_embeddings.") and key in own and value.shape != own[key].shape \
                and value.dim() == 3 and (value.shape[0], value.shape[2]) == (own[key].shape[0], own[key].shape[2]):
            log.info("init_from %s: %s has %d frames, the model %d: resampled (nearest)", folder, key,
                     value.shape[1], own[key].shape[1])
            state[key] = resize_frames(value, own[key].shape[1])
    try:
        check_state(task, state, f"init_from={path} ({folder / ckpt.WEIGHTS})", target="the configured model",
                    fix="Use the model config the checkpoint was trained with (its config.json's model section).")
    except KeyError as err:
        raise UserError(" ".join(str(err).split("\n"))) from None
    task.load_state_dict(state, strict=False)  # check_state proved every key present (shared tensors once)
    return folder


def datasets(cfg: GramConfig, training: bool) -> tuple[VideoTextDataset | None, VideoTextDataset | None]:
    mods = cfg.model.modalities
    train = VideoTextDataset(cfg.data.train, cfg.data, mods, training=True, seed=cfg.seed) \
        if training and cfg.data.train and not cfg.data.shards else None
    # Evaluation reads only the modalities it scores (e.g. a T-VASD model evaluated as T-VAS needs no depth maps).
    test_mods = cfg.eval.modalities or mods
    test = VideoTextDataset(cfg.data.test, cfg.data, test_mods, training=False, allow_missing=cfg.eval.allow_missing,
                            report_dir=cfg.output_dir) if cfg.data.test else None
    return train, test


def checkpoint_hash(folder: Path) -> str:
    """The full sha256 of a checkpoint's weights file (compare with `sha256sum <folder>/model.safetensors`)."""
    return file_sha256(folder / ckpt.WEIGHTS)


def flat_result(result: dict[str, Any]) -> dict[str, Any]:
    """results.json entry: the primary (volume) scoring flat, every scoring and the protocol beside it."""
    primary = result["scorings"]["volume"]
    return {**primary, "n_queries": primary["t2v_n_queries"], "n_candidates": primary["t2v_n_candidates"],
            **{k: v for k, v in result.items() if k != "missing_ids"}, "n_missing": len(result["missing_ids"])}


def run(cfg_node: DictConfig) -> dict[str, Any]:
    use_job_folder(cfg_node)
    cfg = to_dataclass(cfg_node)
    launch.init_from_env()
    try:
        with logging_redirect_tqdm():  # log lines go above the progress bars, never onto them
            return _run(cfg, OmegaConf.to_container(cfg_node, resolve=True))
    finally:
        launch.destroy()


def _hydra() -> Any:
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get() if HydraConfig.initialized() else None


def use_job_folder(cfg_node: DictConfig) -> None:
    """Under `-m` every job writes into its own folder, Hydra's job dir (`<output_dir>/<job number>`, see
    configs/config.yaml), never into the sweep's shared output_dir."""
    from hydra.types import RunMode

    hydra_cfg = _hydra()
    if hydra_cfg is not None and hydra_cfg.mode == RunMode.MULTIRUN:
        cfg_node.output_dir = hydra_cfg.runtime.output_dir


def own_output_dir(cfg: GramConfig, output_dir: Path) -> rundir.RunLock:
    """Collective: lock output_dir for this run (rank 0) and, for a fresh training run, refuse a folder holding
    another run's checkpoints. Every rank fails together, with rank 0's one-line reason."""
    lock, error = rundir.RunLock(output_dir), None
    if dist.is_main_process():
        try:
            lock.acquire()
            if cfg.mode == "train" and not cfg.trainer.resume:
                rundir.refuse_foreign_checkpoints(output_dir)
        except UserError as exc:
            lock.release()
            error = str(exc)
    error = launch.first_error(error)
    if error is not None:
        raise UserError(error) if dist.is_main_process() else SystemExit(EXIT_USER_ERROR)
    return lock


def _save_hydra_record(config_dict: dict[str, Any], output_dir: Path) -> None:
    """What Hydra's `output_subdir` would hold (the job config, Hydra's config, the overrides), written once this
    run owns the folder."""
    hydra_cfg = _hydra()
    if hydra_cfg is None:
        return
    record = output_dir / ".hydra"
    record.mkdir(exist_ok=True)
    for name, node in (("config.yaml", config_dict), ("hydra.yaml", {"hydra": hydra_cfg}),
                       ("overrides.yaml", hydra_cfg.overrides.task)):
        (record / name).write_text(OmegaConf.to_yaml(node))


def _run(cfg: GramConfig, config_dict: dict[str, Any]) -> dict[str, Any]:
    output_dir = Path(cfg.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    lock = own_output_dir(cfg, output_dir)
    try:
        if dist.is_main_process():
            log.info("output folder: %s", output_dir.resolve())
            _save_hydra_record(config_dict, output_dir)
        return _run_owned(cfg, config_dict, output_dir)
    finally:
        lock.release()


def _run_owned(cfg: GramConfig, config_dict: dict[str, Any], output_dir: Path) -> dict[str, Any]:
    device = pick_device(cfg.trainer.device)
    seed_everything(cfg.seed)
    if cfg.trainer.deterministic:
        make_deterministic()
    torch.autograd.set_detect_anomaly(cfg.trainer.detect_anomaly)
    prepare_sample_data(cfg)
    source = ckpt.resolve_checkpoint(pretrained_source(cfg.checkpoint, cfg)) if cfg.mode == "test" else None
    init_from = None
    if source is not None:
        cfg.data = data_bound_to_checkpoint(cfg.data, source)
    elif cfg.init_from:  # resolved (maybe fetched) before the long builds; the word embeddings bring their vocabulary
        init_from = pretrained_source(cfg.init_from, cfg, cfg.model.modalities)
        cfg.data.tokenizer = checkpoint_vocabulary(ckpt.resolve_checkpoint(init_from)) or cfg.data.tokenizer
    config_dict.setdefault("data", {})["tokenizer"] = cfg.data.tokenizer  # what checkpoints copy inside
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    collate = Collator(tokenizer, cfg.data.max_text_len, cfg.data.max_subtitle_len)
    if source is not None:  # the model, loss and preprocessing are the checkpoint's own, whatever the config says
        task = task_from_checkpoint(source, tokenizer)
        cfg.model, cfg.loss = task.model.cfg, task.loss.cfg
        preset = checkpoint_preset(source, cfg.data.preprocessing)
        cfg.data.preprocessing = config_dict["data"]["preprocessing"] = preset
    train_set, test_set = datasets(cfg, training=cfg.mode == "train")  # data errors before a long model build
    if source is None:
        task = GramTask(build_model(cfg.model, tokenizer), cfg.loss)
        if init_from:
            load_init_weights(task, init_from)
    task.to(device)
    logger = RunLogger(cfg.logger, output_dir, config_dict, resume=cfg.mode == "train" and cfg.trainer.resume,
                       job_type=cfg.mode) if dist.is_main_process() else None

    def evaluate() -> dict[str, Any]:
        batch = _local_batch(cfg.data.test_batch_size)
        if cfg.eval.task == "classification":
            res = evaluate_classification(task.model, test_set, collate, cfg.eval, batch, cfg.data.num_workers, device,
                                          progress=cfg.logger.progress_bar)
            return {**res["scorings"]["volume"], **res}
        res = evaluate_retrieval(task.model, test_set, collate, cfg.eval, batch, cfg.data.num_workers, device,
                                 progress=cfg.logger.progress_bar)
        return flat_result(res)

    try:
        result = None
        if cfg.mode == "train":
            stream = train_stream(cfg, train_set, collate)
            trainer = Trainer(cfg, task, stream, device, config_dict, str(output_dir),
                              evaluate=evaluate if test_set else None, logger=logger)
            if cfg.trainer.resume:
                trainer.resume()
            else:
                trainer.truncate_history()  # lines of an earlier run here that saved no checkpoint
            result = trainer.fit()
            source = trainer.last_checkpoint  # this run's own, never an older run's
            if trainer.stopped_by and dist.is_main_process():
                overrides = list(_hydra().overrides.task) if _hydra() is not None else None
                log.info("stopped at step %d by %s; checkpoint %s; resume with: %s", trainer.step,
                         trainer.stopped_by, source, rundir.resume_command(output_dir, overrides))
        elif test_set is not None:
            result = evaluate()
        if result is not None:
            result.pop("_improved", None)
            result["checkpoint"], result["checkpoint_sha256"] = str(source), checkpoint_hash(source)
            if cfg.reproduction.get("expected"):
                result["paper"] = cfg.reproduction["expected"]
            _report({cfg.data.name: result}, output_dir)
            if logger:
                logger.log_results({cfg.data.name: result})
        return {cfg.data.name: result} if result is not None else {}
    finally:
        if logger:
            logger.close()


def pretrained_source(value: str | None, cfg: GramConfig, modalities: list[str] | None = None) -> str | Path | None:
    """``checkpoint=`` / ``init_from=``: a path as given, or a released model's name (gram.pretrained) resolved
    under ``paths.weights_dir`` and converted for ``modalities``. Rank 0 downloads/converts, the others wait."""
    if not value or not is_pretrained_name(value):
        return resolve_model_source(value) if value else value  # a misspelt name is an error listing close names
    path, error = None, None
    if dist.is_main_process():
        try:
            path = resolve_model_source(value, cfg.paths.weights_dir, modalities)
        except Exception as err:  # every rank must leave the collective below, then rank 0 raises it
            error = err
    failure = dist.all_gather_object(None if error is None else str(error))[0]  # rank 0's outcome, on every rank
    if error is not None:
        raise error
    if failure is not None:
        raise UserError(f"{value!r} could not be resolved on rank 0: {failure}")
    if not dist.is_main_process():
        path = resolve_model_source(value, cfg.paths.weights_dir, modalities, download=False)
    return path


def train_stream(cfg: GramConfig, train_set: VideoTextDataset | None, collate: Collator):
    """Map-style files (`data.train`) or streamed webdataset shards (`data.shards`), behind one interface."""
    micro_batch = _local_batch(cfg.data.batch_size, cfg.trainer.grad_accum_steps)
    if cfg.data.shards is None:
        return TrainStream(train_set, collate, micro_batch, cfg.data.num_workers, cfg.seed)
    from gram.data.shards import ShardDecoder, ShardStream

    decoder = ShardDecoder(cfg.data, cfg.model.modalities, training=True)
    return ShardStream(cfg.data.shards, decoder, collate, micro_batch, cfg.data.num_workers, cfg.seed)


def _local_batch(global_batch: int, accum: int = 1) -> int:
    world = dist.get_world_size()
    if global_batch % (world * accum):
        raise ValueError(f"batch size {global_batch} is not divisible by world size {world} x grad_accum_steps "
                         f"{accum}; choose a multiple")
    return global_batch // (world * accum)


def _report(results: dict[str, Any], output_dir: Path) -> None:
    if not dist.is_main_process():
        return
    for name, result in results.items():
        warning = warn_if_incomplete(result, name)
        if warning:
            result["warning"] = warning
    print(format_table(results), flush=True)
    for name, result in results.items():  # the log file gets the numbers; the console already has the table
        log.info("results %s: %s", name, " ".join(f"{k}={v:.4g}" for k, v in result.items()
                                                  if isinstance(v, (int, float)) and not isinstance(v, bool)))
    path = output_dir / "results.json"
    record = provenance()
    path.write_text(json.dumps({name: {**rounded(result), "provenance": record} for name, result in results.items()},
                               indent=2))
    log.info("wrote %s", path)
