"""`python run.py`: config -> data + model -> loss -> trainer -> evaluation, in one process per rank."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from gram import distributed as dist
from gram.config import GramConfig, LossConfig, ModelConfig, typed_section, without_pretrained
from gram.data.dataset import Collator, VideoTextDataset
from gram.data.loader import TrainStream
from gram.data.tokenizer import load_tokenizer
from gram.eval.classification import evaluate_classification
from gram.eval.retrieval import evaluate_retrieval, format_table, warn_if_incomplete
from gram.models.gram_model import GramModel
from gram.train import checkpoint as ckpt
from gram.train import launch
from gram.train.logger import RunLogger
from gram.train.task import GramTask
from gram.train.trainer import Trainer

log = logging.getLogger("gram")


def to_dataclass(cfg: DictConfig) -> GramConfig:
    """Typed, validated config (runs every `__post_init__`)."""
    return OmegaConf.to_object(cfg)


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
                                num_test=cfg.data.sample_test_size, seed=0)
    launch.barrier()


def build_model(model_cfg: ModelConfig, tokenizer) -> GramModel:
    if len(tokenizer) > model_cfg.text.vocab_size:
        raise ValueError(f"the tokenizer has {len(tokenizer)} entries but model.text.vocab_size is "
                         f"{model_cfg.text.vocab_size}; use the model's own vocabulary (data.tokenizer)")
    model = GramModel(model_cfg)
    model.set_frozen()
    return model


def task_from_checkpoint(folder: Path, tokenizer) -> GramTask:
    """The task (model and loss) a checkpoint folder was trained as, rebuilt from its config.json and loaded
    strictly (the file holds the whole task, so tied weights saved once are restored too)."""
    saved, source = ckpt.read_config(folder), str(folder / ckpt.CONFIG)
    model_cfg = without_pretrained(typed_section(ModelConfig, saved.get("model"), source))
    task = GramTask(build_model(model_cfg, tokenizer), typed_section(LossConfig, saved.get("loss"), source))
    ckpt.load_weights(task, folder, strict=True)
    return task


def datasets(cfg: GramConfig, training: bool) -> tuple[VideoTextDataset | None, VideoTextDataset | None]:
    mods = cfg.model.modalities
    train = VideoTextDataset(cfg.data.train, cfg.data, mods, training=True, seed=cfg.seed) \
        if training and cfg.data.train and not cfg.data.shards else None
    test = VideoTextDataset(cfg.data.test, cfg.data, mods, training=False, allow_missing=cfg.eval.allow_missing,
                            report_dir=cfg.output_dir) if cfg.data.test else None
    return train, test


def checkpoint_hash(folder: Path) -> str:
    digest = hashlib.sha256()
    with open(folder / ckpt.WEIGHTS, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def flat_result(result: dict[str, Any]) -> dict[str, Any]:
    """results.json entry: the primary (volume) scoring flat, every scoring and the protocol beside it."""
    primary = result["scorings"]["volume"]
    return {**primary, "n_queries": primary["t2v_n_queries"], "n_candidates": primary["t2v_n_candidates"],
            **{k: v for k, v in result.items() if k != "missing_ids"}, "n_missing": len(result["missing_ids"])}


def run(cfg_node: DictConfig) -> dict[str, Any]:
    cfg = to_dataclass(cfg_node)
    launch.init_from_env()
    try:
        return _run(cfg, OmegaConf.to_container(cfg_node, resolve=True))
    finally:
        launch.destroy()


def _run(cfg: GramConfig, config_dict: dict[str, Any]) -> dict[str, Any]:
    output_dir = Path(cfg.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    device = pick_device(cfg.trainer.device)
    seed_everything(cfg.seed)
    if cfg.trainer.deterministic:
        make_deterministic()
    torch.autograd.set_detect_anomaly(cfg.trainer.detect_anomaly)
    prepare_sample_data(cfg)
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    collate = Collator(tokenizer, cfg.data.max_text_len, cfg.data.max_subtitle_len)
    source = ckpt.resolve_checkpoint(cfg.checkpoint) if cfg.mode == "test" else None
    if source is not None:  # the model and loss are the checkpoint's own, whatever the command line says
        task = task_from_checkpoint(source, tokenizer)
        cfg.model, cfg.loss = task.model.cfg, task.loss.cfg
    train_set, test_set = datasets(cfg, training=cfg.mode == "train")  # data errors before a long model build
    if source is None:
        task = GramTask(build_model(cfg.model, tokenizer), cfg.loss)
        if cfg.init_from:
            ckpt.load_weights(task, cfg.init_from)
    task.to(device)
    logger = RunLogger(cfg.logger, output_dir, config_dict) if dist.is_main_process() else None

    def evaluate() -> dict[str, Any]:
        batch = _local_batch(cfg.data.test_batch_size)
        if cfg.eval.task == "classification":
            res = evaluate_classification(task.model, test_set, collate, cfg.eval, batch, cfg.data.num_workers, device)
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
            result = trainer.fit()
            source = ckpt.list_checkpoints(output_dir)[-1]
        elif test_set is not None:
            result = evaluate()
        if result is not None:
            result.pop("_improved", None)
            result["checkpoint"], result["checkpoint_sha256"] = str(source), checkpoint_hash(source)
            if cfg.reproduction.get("expected"):
                result["paper"] = cfg.reproduction["expected"]
            _report({cfg.data.name: result}, output_dir)
        return {cfg.data.name: result} if result is not None else {}
    finally:
        if logger:
            logger.close()


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
    path.write_text(json.dumps(results, indent=2))
    log.info("wrote %s", path)
