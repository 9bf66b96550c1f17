"""``protodiff study CONFIG``: the paper's data-efficiency experiment from one config file.

Stages, each written into the study's run directory and skipped when already done
(so a stopped study resumes)::

    RUN/
      diffusion/                 latent diffusion + prototype classifier trained on the real store (or a given model)
      synthetic.zarr             prototype-guided synthetic patches (or a given, already sampled store)
      synthetic-unguided.zarr    unguided synthetic patches (the ablation, guidance 0; or a given store)
      pretrain/<arm>/            DINO runs: real, synthetic, hybrid, unguided; random: a random-initialised encoder
      evaluations/<encoder>/<task>/   one evaluate-mil / evaluate-probe run per encoder and task
      outputs/report.md          results table, metric bars, ROC / Kaplan-Meier curves, data size plot
      stages.json                finished stages

Every encoder (the pretrained arms plus any user-supplied ones) is evaluated on the
same tasks, folds and patients, so the report's paired comparisons are valid.
Paths in the config are relative to the config file's folder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..jobs import RunDir, atomic_write_json
from ..progress import CancelToken, Progress
from .errors import EvaluationError

ARMS = ("real", "synthetic", "hybrid", "unguided", "random")


class StudyTask(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    kind: Literal["mil", "probe"] = "mil"
    cohort: str | None = None
    store: str | None = None
    patches: str | None = None
    task: Literal["auto", "classification", "survival"] = "auto"
    loss: Literal["nll", "cox"] = "nll"
    folds: int = Field(5, ge=2)
    epochs: int = Field(40, ge=1)

    @model_validator(mode="after")
    def _inputs(self) -> "StudyTask":
        if self.kind == "mil" and not (self.cohort and self.store):
            raise ValueError(f"Task '{self.name}' (mil) needs cohort and store.")
        if self.kind == "probe" and not self.patches:
            raise ValueError(f"Task '{self.name}' (probe) needs patches.")
        return self


class StudyConfig(BaseModel):
    """The study file (JSON or YAML)."""

    model_config = ConfigDict(extra="forbid")

    real: list[str] = Field(default_factory=list, description="Real patch stores (diffusion and pretraining).")
    arms: list[Literal["real", "synthetic", "hybrid", "unguided", "random"]] = Field(default_factory=lambda: list(ARMS))
    diffusion_model: str | None = Field(None, description="An already trained diffusion model folder.")
    synthetic: str | None = Field(None, description="An already sampled prototype-guided synthetic store (no sampling).")
    synthetic_unguided: str | None = Field(None, description="An already sampled unguided synthetic store (no sampling).")
    diffusion: dict[str, Any] = Field(default_factory=lambda: {"preset": "tiny"})
    prototypes_k: int = Field(8, ge=2, description="Prototypes fitted on the real store when it has none.")
    n_synthetic: int = Field(256, ge=1)
    guidance: float = Field(3.0, ge=0)
    hybrid_real_fraction: float = Field(0.5, gt=0, lt=1)
    pretrain: dict[str, Any] = Field(default_factory=lambda: {"preset": "tiny"})
    encoders: dict[str, str] = Field(default_factory=dict, description="User-supplied encoders: name -> name or path.")
    tasks: list[StudyTask]
    reference: str | None = Field(None, description="Encoder the others are compared to (default: real, else the first).")
    n_boot: int = Field(1000, ge=0)
    n_perm: int = Field(0, ge=0)
    device: str = "auto"
    seed: int = 0
    notes: list[str] = Field(default_factory=list, description="Lines put at the top of the report.")

    @model_validator(mode="after")
    def _needs(self) -> "StudyConfig":
        if self.arms and not self.real:
            raise ValueError("The study's encoder arms need the real patch store(s) they start from (real).")
        if not self.arms and not self.encoders:
            raise ValueError("The study has no encoder: list arms and/or encoders.")
        if not self.tasks:
            raise ValueError("The study has no evaluation task (tasks).")
        return self


def load_study_config(path: str | Path) -> StudyConfig:
    """Read a study file; relative paths resolve against its folder; one sentence on bad input."""
    p = Path(path)
    if not p.is_file():
        raise EvaluationError(f"{p}: no such study config file.")
    try:
        text = p.read_text(encoding="utf-8")
        if p.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as exc:  # noqa: BLE001
        raise EvaluationError(f"{p}: cannot be parsed ({exc}).") from None
    if not isinstance(data, dict):
        raise EvaluationError(f"{p}: the study config must be a mapping of settings.")
    base = p.resolve().parent

    def res(v):
        return None if v is None else str((base / Path(v).expanduser()).resolve())

    data["real"] = [res(x) for x in data.get("real", [])]
    for key in ("diffusion_model", "synthetic", "synthetic_unguided"):
        if data.get(key):
            data[key] = res(data[key])
    data["encoders"] = {k: (res(v) if (base / v).exists() else v) for k, v in (data.get("encoders") or {}).items()}
    for t in data.get("tasks", []) or []:
        if isinstance(t, dict):
            for key in ("cohort", "store", "patches"):
                if t.get(key):
                    t[key] = res(t[key])
    try:
        return StudyConfig(**data)
    except ValueError as exc:
        errors = getattr(exc, "errors", None)
        msg = errors()[0]["msg"] if callable(errors) else str(exc)
        raise EvaluationError(f"{p}: {msg.removeprefix('Value error, ')}") from None


def _stages(rd: RunDir) -> dict[str, Any]:
    f = rd.path / "stages.json"
    return json.loads(f.read_text()) if f.is_file() else {}


def _done(rd: RunDir, name: str, value: Any) -> None:
    s = _stages(rd)
    s[name] = value
    atomic_write_json(rd.path / "stages.json", s)


def _random_encoder(cfg: StudyConfig, dest: Path) -> str:
    """A random-initialised backbone of the pretraining architecture, exported like a trained one."""
    import torch

    from ..ssl.config import PretrainConfig
    from ..ssl.dino import build_backbone
    from ..ssl.export import encoder_config, export_encoder
    from ..store import PatchStore

    pc = PretrainConfig(**{**cfg.pretrain, "real": cfg.real, "real_fraction": 1.0})
    torch.manual_seed(cfg.seed)
    bb = build_backbone(pc, drop_path=0.0)
    st = PatchStore(cfg.real[0])
    conf = encoder_config(pc, bb.num_features, st.mpp, st.patch_size, {"random_init": True, "seed": cfg.seed})
    return str(export_encoder(bb, dest, conf))


def _n_patches(stores: list[str]) -> int:
    from ..store import PatchStore

    return sum(PatchStore(s).summary()["n_patches"] for s in stores)


def run_study(config: StudyConfig, run_dir: str | Path, resume: bool = False,
              cancel: CancelToken | None = None) -> Iterator[Progress]:
    """Run the study; a generator of progress events returning ``(rows, report path, run dir)``."""
    from .compare import results_table
    from .mil import MILConfig
    from .probe import ProbeConfig
    from .report import write_report
    from .runs import evaluate_mil, evaluate_probe, running_fresh, tracked

    cfg = config
    rd = RunDir.prepare(run_dir, "study", cfg.model_dump(), resume=resume)
    with running_fresh(rd, fresh=False):  # a signal while it is being marked running still ends it 'cancelled'
        encoders: dict[str, str] = {}
        sizes: dict[str, float] = {}
        synth_arms = [a for a in cfg.arms if a in ("synthetic", "hybrid", "unguided")]
        if synth_arms:
            yield from tracked(_synthesize(cfg, rd, synth_arms, cancel), rd)
        st = _stages(rd)
        n_real = _n_patches(cfg.real) if cfg.real else 0
        n_syn, n_ung = (_n_patches([p]) if p else cfg.n_synthetic for p in (cfg.synthetic, cfg.synthetic_unguided))
        for arm in cfg.arms:
            key = f"pretrain:{arm}"
            if key not in st:
                yield Progress(0, 0, f"pretraining the {arm} encoder")
                if arm == "random":
                    path = _random_encoder(cfg, rd.path / "pretrain" / "random")
                else:
                    path = yield from tracked(_pretrain(cfg, rd, arm, st, cancel), rd)
                _done(rd, key, path)
                st = _stages(rd)
            encoders[arm] = st[key]
            sizes[arm] = {"real": n_real, "synthetic": n_syn, "unguided": n_ung,
                          "hybrid": n_real + n_syn}.get(arm)
        encoders.update(cfg.encoders)
        sizes = {k: v for k, v in sizes.items() if v}
        results: dict[str, dict[str, Any]] = {}
        for enc_name, enc in encoders.items():
            results[enc_name] = {}
            for t in cfg.tasks:
                out = rd.path / "evaluations" / enc_name / t.name
                yield Progress(0, 0, f"evaluating {enc_name} on {t.name}")
                rd.set_status("running", step=None, total=None, message=f"evaluating {enc_name} on {t.name}")
                if t.kind == "mil":
                    mc = MILConfig(task=t.task, loss=t.loss, folds=t.folds, epochs=t.epochs, n_boot=cfg.n_boot,
                                   seed=cfg.seed, device=cfg.device)
                    res, _ = yield from evaluate_mil(t.cohort, t.store, out, mc, encoder=enc, device=cfg.device,
                                                     resume=True, cancel=cancel)
                    results[enc_name][t.name] = res
                else:
                    pc = ProbeConfig(encoder=enc, device=cfg.device, folds=t.folds, n_boot=cfg.n_boot, seed=cfg.seed)
                    res, _ = yield from evaluate_probe(t.patches, out, pc, resume=True, cancel=cancel)
                    for probe in res.metrics:
                        results[enc_name][f"{t.name}:{probe}"] = _as_probe(res, probe)
        ref = cfg.reference or ("real" if "real" in encoders else next(iter(encoders)))
        rows = results_table(results, reference=ref, n_boot=max(cfg.n_boot, 200), n_perm=cfg.n_perm, seed=cfg.seed)
        notes = [*cfg.notes, f"encoders: {', '.join(f'{k} ({v})' for k, v in encoders.items())}",
                 f"reference: {ref}"]
        if synth_arms:
            given = [p for p in (cfg.synthetic, cfg.synthetic_unguided) if p]
            notes.append(f"synthetic patches: {n_syn} guided (guidance {cfg.guidance:g}), {n_ung} unguided"
                         + (f"; already sampled stores: {', '.join(given)}" if given else ""))
        report = write_report(rd.outputs, rows, results, title="Data-efficiency study", reference=ref, sizes=sizes,
                              notes=notes)
        rd.set_status("finished", message="finished", report=str(report))
    return rows, report, rd


def _as_probe(res, probe: str):
    """A probe's view with one prediction set, so the table treats each probe as a task."""
    import copy

    r = copy.copy(res)
    r.metrics = {probe: res.metrics[probe]}
    r.predictions = {probe: res.predictions[probe]}
    return r


def _synthesize(cfg: StudyConfig, rd: RunDir, arms: list[str], cancel) -> Iterator[Progress]:
    from ..diffusion.config import DiffusionConfig, SampleConfig
    from ..diffusion.fit import train_diffusion
    from ..diffusion.synthesize import synthesize
    from ..store import PatchStore

    wanted = {"synthetic.zarr": cfg.guidance} if {"synthetic", "hybrid"} & set(arms) else {}
    if "unguided" in arms:
        wanted["synthetic-unguided.zarr"] = 0.0
    given = {"synthetic.zarr": cfg.synthetic, "synthetic-unguided.zarr": cfg.synthetic_unguided}
    for name in list(wanted):
        if given[name]:  # already sampled (e.g. by protodiff demo): used as it is
            if not PatchStore.is_store(given[name]):
                raise EvaluationError(f"{given[name]}: not a patch store (the study's {name.split('.')[0]} store).")
            _done(rd, f"sample:{name}", given[name])
        if f"sample:{name}" in _stages(rd):
            del wanted[name]
    if not wanted:
        return
    st = _stages(rd)
    model = cfg.diffusion_model
    if model is None:
        model = st.get("diffusion")
        if model is None:
            yield from _ensure_prototypes(cfg, cancel)
            d = dict(cfg.diffusion)
            preset = d.pop("preset", "tiny")
            dc = DiffusionConfig.from_preset(preset, **d)
            yield from train_diffusion(cfg.real[0], rd.path / "diffusion", dc, overwrite=True, cancel=cancel)
            model = str(rd.path / "diffusion")
            _done(rd, "diffusion", model)
    for name, g in wanted.items():
        out = rd.path / name
        yield from synthesize(model, out, SampleConfig(n=cfg.n_synthetic, guidance=g, seed=cfg.seed, device=cfg.device),
                              cancel=cancel)
        _done(rd, f"sample:{name}", str(out))


def _ensure_prototypes(cfg: StudyConfig, cancel) -> Iterator[Progress]:
    """Prototypes of the real store (built-in embeddings + k-means) when it has none: diffusion guidance needs them."""
    from ..embedding import EmbedConfig, embed_store, embedding_keys
    from ..prototypes import PrototypeConfig, fit_prototypes, prototype_status
    from ..store import PatchStore

    st = PatchStore(cfg.real[0])
    if prototype_status(st) == "complete":
        return
    if "builtin" not in embedding_keys(st):
        yield from embed_store(st.path, EmbedConfig(encoder="builtin", device="cpu"), cancel=cancel)
    yield from fit_prototypes(st.path, PrototypeConfig(k=cfg.prototypes_k, encoder="builtin", seed=cfg.seed,
                                                       overwrite=True), cancel=cancel)


def _pretrain(cfg: StudyConfig, rd: RunDir, arm: str, st: dict, cancel) -> Iterator[Progress]:
    from ..ssl.config import PretrainConfig
    from ..ssl.train import pretrain

    syn = st.get("sample:synthetic.zarr")
    unguided = st.get("sample:synthetic-unguided.zarr")
    base = {**cfg.pretrain, "seed": cfg.seed, "device": cfg.device}
    spec = {
        "real": dict(real=cfg.real, real_fraction=1.0),
        "synthetic": dict(synthetic=[syn], real_fraction=0.0),
        # resize: a synthetic store records the real patches' measured µm/px (e.g. 0.998), the real store the
        # requested one (1.0); the pretraining refuses to mix them unless told to resample
        "hybrid": dict(real=cfg.real, synthetic=[syn], real_fraction=cfg.hybrid_real_fraction, resize=True),
        "unguided": dict(synthetic=[unguided], real_fraction=0.0),
    }[arm]
    pc = PretrainConfig(**{**base, **spec})
    result = yield from pretrain(pc, rd.path / "pretrain" / arm, resume=True, cancel=cancel)
    return result.encoder


SMOKE_NOTE = ("**Smoke-scale demonstration.** The DINO encoders here saw {images} images ({steps} steps) each, of a few "
              "hundred 32-px patches of one slide (so they stay close to their common random initialisation), and "
              "the tasks are {tasks}: the numbers only show that the machinery runs end to end; at this scale they "
              "are not meaningful and say nothing about real, synthetic or hybrid pretraining.")

DEMO_PRETRAIN = {"preset": "tiny", "epochs": 1, "images_per_epoch": 64, "workers": 0}


def write_demo_study(folder: str | Path, full: bool = True) -> Iterator[Progress]:
    """A tiny study on the bundled sample slide (a generator of progress returning the config path).

    The slide is tiled (32 px at 1 µm/px) into ``folder/real.zarr`` and embedded with the
    built-in encoder; the tasks are written beside it (:func:`demo_study_config`). The config
    runs every arm with settings that only show the machinery works (10 training steps per
    model, 16 synthetic patches; about 7 minutes on two busy CPU cores) when ``full``, or
    only the random-initialised encoder and the built-in one.
    """
    from ...data import SAMPLE_SLIDE
    from ..embedding import EmbedConfig, embed_store
    from ..tiling import TilingConfig, tile_slides

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    real = out / "real.zarr"
    if not real.exists():
        yield from tile_slides([SAMPLE_SLIDE], real, TilingConfig(size=32, mpp=1.0))
        yield from embed_store(real, EmbedConfig(encoder="builtin", device="cpu"))
    return (yield from demo_study_config(
        out, real, full=full, n_synthetic=16, pretrain=DEMO_PRETRAIN,
        diffusion={"preset": "tiny", "autoencoder": {"steps": 10}, "unet": {"steps": 10}, "classifier": {"steps": 10}}))


def demo_study_config(folder: str | Path, real: str | Path, full: bool = True, pretrain: dict | None = None,
                      diffusion: dict | None = None, diffusion_model: str | Path | None = None,
                      synthetic: str | Path | None = None, synthetic_unguided: str | Path | None = None,
                      guidance: float = 3.0, n_synthetic: int = 16, probe: bool = True) -> Iterator[Progress]:
    """The tiny study's tasks and config in ``folder`` (a generator of progress returning ``folder/study.json``).

    ``real`` is a patch store of small patches (32 px at 1 µm/px in the demos); its built-in
    embeddings (computed when missing) pick the prototype to plant. Written into ``folder``:

    - ``cohort/cohort.csv`` + ``cohort/cohort.zarr``: a planted classification cohort of
      virtual slides made of the store's real patches (:func:`.planted.write_planted_cohort`;
      16 patients, 2 slides each, 16 patches a slide), the MIL task ``planted``;
    - per patch of ``cohort.zarr`` a ``labels`` array (1: the planted prototype, 0: another),
      which makes the same store a labelled patch set: the probe task ``planted-patches``
      (linear and k-NN, grouped by virtual slide; only when ``probe``); its embeddings are
      shared with the MIL task;
    - ``study.json``: every arm (``full``) or only the random-initialised one, plus the
      built-in encoder; ``diffusion_model`` / ``synthetic`` / ``synthetic_unguided`` reuse
      what an earlier run made (``protodiff demo``) instead of training and sampling again.
      The report starts with :data:`SMOKE_NOTE`.
    """
    import os

    from ..embedding import EmbedConfig, embed_store, embedding_keys
    from ..ssl.config import PretrainConfig
    from ..store import PatchStore
    from .planted import write_planted_cohort

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    real = Path(real)
    if "builtin" not in embedding_keys(PatchStore(real)):
        yield from embed_store(real, EmbedConfig(encoder="builtin", device="cpu"))
    n_patients, slides_per_patient = 16, 2
    if not (out / "cohort" / "cohort.csv").exists():
        yield Progress(0, 0, "writing the planted cohort")
        write_planted_cohort(real, out / "cohort", n_patients=n_patients, slides_per_patient=slides_per_patient,
                             bag_size=16, seed=0)
    _label_planted_patches(out / "cohort" / "cohort.zarr")
    pretrain = dict(pretrain or DEMO_PRETRAIN)
    pc = PretrainConfig(real=[str(real)], **pretrain)
    steps = pc.epochs * (pc.images_per_epoch // pc.batch_size)

    def rel(p):
        return None if p is None else os.path.relpath(Path(p).resolve(), out.resolve())

    cfg = {
        "real": [rel(real)],
        "arms": list(ARMS) if full else ["random"],
        "diffusion": diffusion or {"preset": "tiny"},
        "diffusion_model": rel(diffusion_model),
        "synthetic": rel(synthetic),
        "synthetic_unguided": rel(synthetic_unguided),
        "guidance": guidance,
        "n_synthetic": n_synthetic,
        "pretrain": pretrain,
        "encoders": {"builtin": "builtin"},
        "tasks": [{"name": "planted", "kind": "mil", "cohort": "cohort/cohort.csv", "store": "cohort/cohort.zarr",
                   "folds": 4, "epochs": 20}]
                 + ([{"name": "planted-patches", "kind": "probe", "patches": "cohort/cohort.zarr", "folds": 4}]
                    if probe else []),
        "reference": "real" if full else "builtin",
        "n_boot": 200,
        "notes": [SMOKE_NOTE.format(images=steps * pc.batch_size, steps=steps, tasks=f"a planted cohort of "
                                    f"{n_patients * slides_per_patient} virtual slides made of those patches"
                                    + (" and a patch probe on them" if probe else ""))],
    }
    path = out / "study.json"
    path.write_text(json.dumps({k: v for k, v in cfg.items() if v is not None}, indent=2))
    return path


def _label_planted_patches(store: str | Path) -> None:
    """Per patch of a planted cohort store, a ``labels`` array: 1 where the planted prototype is, else 0."""
    import numpy as np

    from ..store import PatchStore

    for e in PatchStore(store, mode="r+").slides():
        if "labels" in e.group:
            continue
        planted = np.asarray(e.attrs["planted"], bool)
        e.group.create_array("labels", data=planted.astype(np.uint8), chunks=(max(1, len(planted)),),
                             overwrite=True)
