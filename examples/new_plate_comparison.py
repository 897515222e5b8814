"""A new plate without refitting: SCBD against Harmony refitted and Harmony mapped.

Simulates a screen whose last plate is held out (its wells get technical effects
unlike any training well's), ingests the training plates and the new plate into
separate stores with identical options, and corrects the new plate four ways:

- ``scbd``: SCBD trained on the training plates with the demo's options
  (``scbd_cells.core.config.demo_train_options``), embedding the new plate as it stands;
- ``harmony_refit``: the handcrafted baseline (uncorrected, standardised and PCA'd
  as the training plates' baseline was) with Harmony refitted on all plates;
- ``harmony_mapped``: the same baseline with Harmony fitted on the training plates
  only and the new plate mapped onto that reference (``correct --reference``,
  Symphony's mapping);
- ``baseline_per_well``: the baseline standardised within each well, a reference
  point; plus the uncorrected ``baseline``.

Each is evaluated on the cells of all plates together, with the new plate reported
apart (``evaluate --holdout-key plate``). It also measures how far the training
plates' corrected profiles move when the new plate arrives (max |delta|).

Every stage is skipped when its output exists: rerun the same command to resume.

Usage::

    python examples/new_plate_comparison.py --out /tmp/new_plate              # demo screen
    python examples/new_plate_comparison.py --out /tmp/new_plate_x3 --cells-per-guide 120
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

import scbd_cells
from scbd_cells.core.config import demo_train_options

CHANNELS = ["dna_damage", "actin", "dna", "microtubules"]
CONTROL = "nontargeting"
SPLIT = (0.75, 0.10, 0.15)  # the demo's train / val / test split
log = logging.getLogger("new_plate_comparison")


def stage(name: str, output: Path, work) -> None:
    """Run ``work()`` unless ``output`` exists already (resume)."""
    if output.exists():
        log.info("%s: %s exists, skipped", name, output)
        return
    started = time.perf_counter()
    work()
    log.info("%s: %.1f s", name, time.perf_counter() - started)


def concat(parts: dict[str, Path], out: Path) -> None:
    """One AnnData with the cells of every part (obs column ``source`` names the part)."""
    joined = ad.concat(
        {name: ad.read_h5ad(path) for name, path in parts.items()}, label="source",
        index_unique="-",
    )  # fmt: skip
    joined.write_h5ad(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="working folder")
    parser.add_argument("--preset", default="demo")
    parser.add_argument("--plates", type=int, default=3)
    parser.add_argument("--holdout-plates", type=int, default=1)
    parser.add_argument("--cells-per-guide", type=int, default=None,
                        help="override the preset's cells per targeting guide (a larger screen)")
    parser.add_argument("--control-cells-per-guide", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None, help="default: the demo's")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    screen = out / "screen"

    # 1. the screen; the last plate(s) held out
    stage("simulate", screen / "truth.json", lambda: scbd_cells.simulate(
        screen, preset=args.preset, plates=args.plates, holdout_plates=args.holdout_plates,
        cells_per_guide=args.cells_per_guide,
        control_cells_per_guide=args.control_cells_per_guide, seed=args.seed,
        workers=args.workers,
    ))  # fmt: skip
    new_plates = json.loads((screen / "truth.json").read_text())["holdout"]["plates"]

    # 2. two tables, two stores, identical options (docs/new-plates.md)
    def split_table() -> None:
        table = pd.read_csv(screen / "cells.csv")
        new = table["plate"].isin(new_plates)
        table[new].to_csv(screen / "new_plate.csv", index=False)
        table[~new].to_csv(screen / "train_plates.csv", index=False)

    stage("split table", screen / "train_plates.csv", split_table)
    stores = {part: out / f"{part}.zarr" for part in ("train_plates", "new_plate")}
    for part, store in stores.items():
        stage(f"ingest {part}", store, lambda part=part, store=store: scbd_cells.ingest(
            screen / f"{part}.csv", out=store, perturbation_column="gene", guide_column="guide",
            control=CONTROL, channel_names=CHANNELS, resize=32, split_fractions=SPLIT,
            seed=args.seed, workers=args.workers,
        ))  # fmt: skip

    # 3. (a) SCBD on the training plates, with the demo's options; embed both stores
    train_obs = scbd_cells.open_store(stores["train_plates"]).obs
    n_classes = int(train_obs.loc[train_obs["split"].astype(str) == "train", "gene"].nunique())
    options = dict(demo_train_options(n_classes), seed=args.seed)
    if args.steps is not None:
        options["steps"] = args.steps
    run_dir = out / "runs" / "scbd"
    trained = out / "runs" / "scbd.finished"

    def train() -> None:  # a run cut short is resumed where it stopped
        resume = (run_dir / "checkpoints" / "last.pt").exists()
        scbd_cells.train(stores["train_plates"], out=run_dir, resume=resume, **options)
        trained.write_text(f"{options}\n")

    stage("train scbd", trained, train)
    embeddings = out / "embeddings"
    scbd_parts = {part: embeddings / "scbd" / f"{part}.h5ad" for part in stores}
    for part, path in scbd_parts.items():
        stage(f"embed {part}", path, lambda part=part, path=path: scbd_cells.embed(
            run_dir, stores[part], out=path,
        ))  # fmt: skip
    stage("concat scbd", embeddings / "scbd.h5ad",
          lambda: concat(scbd_parts, embeddings / "scbd.h5ad"))  # fmt: skip

    # 4. the handcrafted baseline of the training plates, and of the new plate in the
    #    training baseline's space (its channel ranges, standardisation and PCA)
    for name, normalize in (("baseline", "store"), ("baseline_per_well", "batch")):
        parts = {part: embeddings / name / f"{part}.h5ad" for part in stores}
        stage(f"{name} train_plates", parts["train_plates"], lambda p=parts, n=normalize: (
            scbd_cells.baseline(stores["train_plates"], out=p["train_plates"], normalize=n,
                                seed=args.seed)
        ))  # fmt: skip
        stage(f"{name} new_plate", parts["new_plate"], lambda p=parts, n=normalize: (
            scbd_cells.baseline(stores["new_plate"], out=p["new_plate"], normalize=n,
                                reference=p["train_plates"], seed=args.seed)
        ))  # fmt: skip
        stage(f"concat {name}", embeddings / f"{name}.h5ad",
              lambda p=parts, n=name: concat(p, embeddings / f"{n}.h5ad"))  # fmt: skip

    # 5. (b) Harmony refitted on all plates (batch = well), the conventional way
    stage("harmony_refit", embeddings / "harmony_refit.h5ad", lambda: scbd_cells.correct(
        embeddings / "baseline.h5ad", method="harmony", out=embeddings / "harmony_refit.h5ad",
        batch_key="batch", seed=args.seed,
    ))  # fmt: skip
    # (c) Harmony fitted on the training plates; the new plate mapped onto that fit
    mapped = {part: embeddings / "harmony_mapped" / f"{part}.h5ad" for part in stores}
    stage("harmony on the training plates", mapped["train_plates"], lambda: scbd_cells.correct(
        embeddings / "baseline" / "train_plates.h5ad", method="harmony",
        out=mapped["train_plates"], batch_key="batch", seed=args.seed,
    ))  # fmt: skip
    stage("harmony_mapped new_plate", mapped["new_plate"], lambda: scbd_cells.correct(
        embeddings / "baseline" / "new_plate.h5ad", method="harmony", out=mapped["new_plate"],
        batch_key="batch", reference=mapped["train_plates"], seed=args.seed,
    ))  # fmt: skip
    stage("concat harmony_mapped", embeddings / "harmony_mapped.h5ad",
          lambda: concat(mapped, embeddings / "harmony_mapped.h5ad"))  # fmt: skip

    # 6. all on the same cells: the normal table and the held-out plate apart
    names = ["scbd", "harmony_refit", "harmony_mapped", "baseline_per_well", "baseline"]
    report = out / "report"
    stage("evaluate", report / "metrics.json", lambda: scbd_cells.evaluate(
        [embeddings / f"{name}.h5ad" for name in names], corum=screen / "complexes.txt",
        out=report, labels=names, control=CONTROL, holdout_key="plate",
        holdout_batches=new_plates, umap=False, seed=args.seed,
    ))  # fmt: skip

    # 7. how far the training plates' profiles move when the new plate arrives
    stage("earlier profiles", out / "earlier_profiles.json", lambda: earlier_profiles(
        out, run_dir=run_dir, stores=stores, seed=args.seed,
    ))  # fmt: skip
    # 8. why the map's ridge penalty is Symphony's 1: the same map with harmonypy's own rule
    #    (alpha x the expected cells of the batch in the cluster), evaluated the same way
    own_rule = embeddings / "harmony_mapped_own_rule.h5ad"
    stage("harmony_mapped_own_rule", own_rule, lambda: map_with_own_rule(embeddings, own_rule))
    stage("evaluate own rule", out / "report_own_rule" / "metrics.json", lambda: (
        scbd_cells.evaluate(
            [own_rule], corum=screen / "complexes.txt", out=out / "report_own_rule",
            labels=["harmony_mapped_own_rule"], control=CONTROL, holdout_key="plate",
            holdout_batches=new_plates, umap=False, seed=args.seed,
        )
    ))  # fmt: skip
    summary = write_summary(out, names=names)
    print(summary)


def map_with_own_rule(embeddings: Path, out: Path) -> None:
    """The new plate mapped with ``ridge_lambda=None``, beside the training plates' fit."""
    from scbd_cells.profiles.corrections import harmony_map, read_harmony_reference

    reference = read_harmony_reference(embeddings / "harmony_mapped" / "train_plates.h5ad")
    new = ad.read_h5ad(embeddings / "baseline" / "new_plate.h5ad")
    new.X = harmony_map(
        reference, np.asarray(new.X), batches=new.obs["batch"].astype(str).to_numpy(),
        ridge_lambda=None,
    ).astype(np.float32)  # fmt: skip
    del new.obsm["X_features"], new.obsm["X_pca"]
    parts = {"train_plates": embeddings / "harmony_mapped" / "train_plates.h5ad"}
    new.write_h5ad(out.with_name("harmony_mapped_own_rule_new_plate.h5ad"))
    parts["new_plate"] = out.with_name("harmony_mapped_own_rule_new_plate.h5ad")
    concat(parts, out)


def training_rows(path: Path) -> np.ndarray:
    """X of the training plates' cells in a concatenated file (``source`` = train_plates)."""
    cells = ad.read_h5ad(path)
    return np.asarray(cells.X[(cells.obs["source"] == "train_plates").to_numpy()])


def earlier_profiles(out: Path, *, run_dir: Path, stores: dict[str, Path], seed: int) -> None:
    """max |delta| of the training plates' corrected profiles: before the new plate arrived
    (each method on the training plates alone) against after (what each method gives them
    once the new plate is in). (b) refits Harmony; (a) and (c) recompute nothing of theirs,
    checked here by recomputing them (a: embed again; c: Harmony on the training plates
    again) after the new plate was processed."""
    embeddings = out / "embeddings"
    before = ad.read_h5ad(embeddings / "harmony_mapped" / "train_plates.h5ad").X
    scale = float(np.std(before))
    refit = training_rows(embeddings / "harmony_refit.h5ad")
    check = out / "check"
    check.mkdir(exist_ok=True)
    again = {
        "scbd": scbd_cells.embed(run_dir, stores["train_plates"], out=check / "scbd.h5ad",
                                 overwrite=True).out_path,
        "harmony_mapped": scbd_cells.correct(
            embeddings / "baseline" / "train_plates.h5ad", method="harmony",
            out=check / "harmony.h5ad", batch_key="batch", seed=seed, overwrite=True,
        ).out_path,
    }  # fmt: skip
    # what a biologist sees move: each cell's profile, and each gene's mean profile
    # (cells of the training plates, control mean subtracted)
    cell_change = np.linalg.norm(refit - before, axis=1) / np.linalg.norm(before, axis=1)
    genes = ad.read_h5ad(embeddings / "harmony_mapped" / "train_plates.h5ad").obs["perturbation"]
    genes = genes.astype(str).to_numpy()

    def gene_profiles(values: np.ndarray) -> pd.DataFrame:
        means = pd.DataFrame(values).groupby(genes).mean()
        return (means - means.loc[CONTROL]).drop(index=CONTROL)

    old_genes, new_genes = gene_profiles(before), gene_profiles(refit)
    cosine = (old_genes * new_genes).sum(axis=1) / (
        np.linalg.norm(old_genes, axis=1) * np.linalg.norm(new_genes, axis=1)
    )
    result = {
        "harmony_refit": {
            "max_abs_delta": float(np.abs(refit - before).max()),
            "median_abs_delta": float(np.median(np.abs(refit - before))),
            "profile_std": scale,
            "median_cell_relative_change": float(np.median(cell_change)),
            "gene_profile_cosine_min": float(cosine.min()),
            "gene_profile_cosine_median": float(cosine.median()),
        },
        "scbd": {
            "max_abs_delta": float(np.abs(
                ad.read_h5ad(again["scbd"]).X - training_rows(embeddings / "scbd.h5ad")
            ).max()),
        },
        "harmony_mapped": {
            "max_abs_delta": float(np.abs(
                ad.read_h5ad(again["harmony_mapped"]).X - training_rows(
                    embeddings / "harmony_mapped.h5ad")
            ).max()),
        },
    }  # fmt: skip
    (out / "earlier_profiles.json").write_text(json.dumps(result, indent=1) + "\n")


def write_summary(out: Path, *, names: list[str]) -> str:
    """The two tables and the earlier profiles' deltas as markdown, and the figure."""
    metrics = json.loads((out / "report" / "metrics.json").read_text())
    held = metrics["holdout"]["embeddings"]
    earlier = json.loads((out / "earlier_profiles.json").read_text())
    # the baselines of the training plates are not refitted for the new plate: no delta
    delta = {name: earlier[name]["max_abs_delta"] if name in earlier else None for name in names}
    lines = [
        "| embedding | CORUM AUPRC ↑ | recall @ 5%/95% ↑ | well F1 ↓ | chance | mAP activity ↑ "
        "| iLISI ↑ | kBET ↑ |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in names:
        row = metrics["embeddings"][name]
        lines.append(
            f"| {name} | {row['corum_auprc']:.4f} | {row['corum_recall_5_95']:.3f} | "
            f"{row['well_f1']:.3f} | {row['well_f1_chance']:.3f} | {row['map_activity']:.3f} | "
            f"{row['ilisi']:.3f} | {row['kbet']:.3f} |"
        )
    lines += [
        "",
        "| embedding | CORUM AUPRC, new plate ↑ | recall @ 5%/95% ↑ | well F1 among its wells ↓ "
        "| chance | new vs rest F1 ↓ | chance | iLISI new/rest ↑ | kBET new/rest ↑ "
        "| training plates' max abs delta |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in names:
        row = held[name]
        lines.append(
            f"| {name} | {row['heldout_corum_auprc']:.4f} | {row['heldout_corum_recall_5_95']:.3f}"
            f" | {row['heldout_well_f1']:.3f} | {row['heldout_well_f1_chance']:.3f} | "
            f"{row['heldout_vs_rest_f1']:.3f} | {row['heldout_vs_rest_chance']:.3f} | "
            f"{row['heldout_ilisi']:.3f} | {row['heldout_kbet']:.3f} | "
            f"{'–' if delta[name] is None else format(delta[name], '.3g')} |"
        )
    from scbd_cells.profiles.corrections import read_harmony_reference, soft_assignments

    embeddings = out / "embeddings"
    reference = read_harmony_reference(embeddings / "harmony_mapped" / "train_plates.h5ad")
    new_plate = ad.read_h5ad(embeddings / "baseline" / "new_plate.h5ad").X
    assignments = soft_assignments(reference, new_plate)
    crowded = len(np.unique(assignments.argmax(axis=1)))
    new_counts = assignments.sum(axis=0)  # the new plate's soft cells per cluster
    outnumbered = new_counts > reference.cluster_sizes
    crowd_share = 100 * new_counts[outnumbered].sum() / len(new_plate)
    own_rule = json.loads((out / "report_own_rule" / "metrics.json").read_text())
    row = own_rule["holdout"]["embeddings"]["harmony_mapped_own_rule"]
    lines += [
        "",
        "harmony_mapped with harmonypy's ridge rule instead of lambda = 1: new plate "
        f"CORUM AUPRC {row['heldout_corum_auprc']:.4f}, well F1 among its wells "
        f"{row['heldout_well_f1']:.3f}, new vs rest F1 {row['heldout_vs_rest_f1']:.3f}, "
        f"iLISI {row['heldout_ilisi']:.3f}, kBET {row['heldout_kbet']:.3f}; all cells: CORUM "
        f"AUPRC {own_rule['embeddings']['harmony_mapped_own_rule']['corum_auprc']:.4f}, "
        f"well F1 {own_rule['embeddings']['harmony_mapped_own_rule']['well_f1']:.3f}. The new "
        f"plate's cells fall nearest to {crowded} of the reference's "
        f"{len(reference.centroids)} clusters; {crowd_share:.0f} % of them lie in the "
        f"{int(outnumbered.sum())} clusters where they outnumber the reference's cells.",
    ]
    refit = earlier["harmony_refit"]
    lines += [
        "",
        f"Training plates' Harmony profiles when the new plate is added and Harmony refitted: "
        f"max |delta| {refit['max_abs_delta']:.3f}, median {refit['median_abs_delta']:.3f} "
        f"(their standard deviation: {refit['profile_std']:.3f}); a cell's profile moves by "
        f"{100 * refit['median_cell_relative_change']:.0f} % of its length (median); the genes'"
        f" mean profiles (control subtracted) keep a cosine of "
        f"{refit['gene_profile_cosine_median']:.3f} with their earlier selves (median; lowest "
        f"{refit['gene_profile_cosine_min']:.3f}).",
    ]
    text = "\n".join(lines) + "\n"
    (out / "comparison.md").write_text(text)
    plot(metrics, delta, names=names, path=out / "comparison.png")
    return text


def plot(metrics: dict, delta: dict[str, float], *, names: list[str], path: Path) -> None:
    """Held-out plate metrics per method, one panel each, and the training plates' delta."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    held = metrics["holdout"]["embeddings"]
    panels = [
        ("heldout_corum_auprc", "CORUM AUPRC\nnew plate alone ↑", None),
        ("heldout_well_f1", "well F1 among the new\nplate's wells ↓ (- - chance)",
         "heldout_well_f1_chance"),
        ("heldout_vs_rest_f1", "F1 new plate vs\ntraining plates ↓ (- - chance)",
         "heldout_vs_rest_chance"),
        ("heldout_ilisi", "iLISI new plate /\ntraining plates ↑", None),
    ]
    colours = ["#1b9e77", "#d95f02", "#7570b3", "#999999", "#cccccc"]
    figure, axes = plt.subplots(1, len(panels) + 1, figsize=(12, 2.9), dpi=90)
    for axis, (key, title, chance) in zip(axes, panels, strict=False):
        values = [held[name][key] for name in names]
        axis.bar(range(len(names)), values, color=colours)
        if chance:
            axis.axhline(held[names[0]][chance], color="black", linestyle="--", linewidth=1)
        axis.set_title(title, fontsize=9)
        axis.set_xticks(range(len(names)), names, rotation=50, ha="right", fontsize=8)
        axis.tick_params(axis="y", labelsize=8)
    axis = axes[-1]
    values = [delta[name] or 0.0 for name in names]
    axis.bar(range(len(names)), values, color=colours)
    for position, (name, value) in enumerate(zip(names, values, strict=True)):
        label = "not refitted" if delta[name] is None else f"{value:.2g}"
        axis.text(position, value, label, ha="center", va="bottom", fontsize=7,
                  rotation=90 if delta[name] is None else 0)  # fmt: skip
    axis.set_ylim(0, max(values) * 1.35 or 1.0)
    axis.set_title("training plates' profiles:\nmax |change| when it arrives ↓", fontsize=9)
    axis.set_xticks(range(len(names)), names, rotation=50, ha="right", fontsize=8)
    axis.tick_params(axis="y", labelsize=8)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


if __name__ == "__main__":
    main()
