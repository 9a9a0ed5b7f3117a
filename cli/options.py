"""Options shared by several commands (one definition each)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    from qdtk.options import QuantizeOptions

include_option = click.option(
    "--include",
    multiple=True,
    metavar="PATTERN",
    help="Quantize only these weights (glob like '*.q_proj.weight', or 're:REGEX'); repeatable. "
    "Default: every 2-D weight inside the numbered transformer blocks, norms excluded.",
)
exclude_option = click.option(
    "--exclude",
    multiple=True,
    metavar="PATTERN",
    help="Leave these weights in full precision (glob or 're:REGEX'); repeatable.",
)
device_option = click.option(
    "--device",
    type=click.Choice(["auto", "cpu", "cuda"]),
    default="auto",
    show_default=True,
    help="Where the solver runs: 'cuda' needs a GPU that CuPy sees; 'auto' uses one if present.",
)


model_code_option = click.option(
    "--model-code", type=click.Choice(["auto", "native", "remote"]), default="auto",
    show_default=True,
    help="Which forward runs the model: native (qdtk's own LLaDA/Dream, any transformers "
    "release), remote (transformers, with the folder's own code under --trust-remote-code), or "
    "auto (for LLaDA/Dream the folder's own code when trusted and it loads and runs here, else "
    "native; says which it used).")


# The CLI's default --rotate-exclude: the Linears reading the attention's input (q/k/v: LLaMA,
# LLaDA, Dream, Qwen; query/key/value: BERT). Rotated, their error on the first token of a
# sequence, the attention sink every later token reads, grows tenfold (README, "Measured").
ROTATE_EXCLUDE = (r"re:(^|\.)(q_proj|k_proj|v_proj|query|key|value)\.weight$",)


def _compose(decorators):
    def apply(f):
        for d in reversed(decorators):
            f = d(f)
        return f

    return apply


cluster_options = _compose([
    click.option("--cluster", default=None, metavar="ray[://ADDRESS]",
                 help="Solve the layers (and the model-scope pre-pass's per-layer work) as tasks "
                 "on a Ray cluster (the `ray` extra): 'ray' uses "
                 "RAY_ADDRESS or a cluster running on this node, else starts a local one; "
                 "ray://HOST:PORT names the head node. Run it on a node of the cluster, with the "
                 "model and statistics folders on storage every node reads."),
    click.option("--num-cpus", default=1, show_default=True, type=click.IntRange(1),
                 help="CPUs each --cluster task reserves, and its threads (the files are the "
                 "serial run's bit for bit at any count); with --backend cuda each task also "
                 "reserves one GPU."),
])


def cluster_options_from(kw: dict) -> dict:
    """{"cluster", "num_cpus"} of the quantize options when --cluster is given (checked now:
    its form, that Ray is installed, that its address answers), else {} (consumes their keys
    from kw)."""
    from qdtk.cluster import check_cluster

    cluster, num_cpus = kw.pop("cluster"), kw.pop("num_cpus")
    return {"cluster": check_cluster(cluster), "num_cpus": num_cpus} if cluster else {}


def capture_options(n: int | None = 128, L: int | None = 2048, device: bool = True):
    """The MCS and model-running options of `qdtk capture` (also offered by `qdtk run`)."""
    opts = [
        click.option("-n", "--nsamples", "n", default=n, show_default=n is not None,
                     type=click.IntRange(1), help="Number of calibration windows N."),
        click.option("-L", "--seqlen", "L", default=L, show_default=L is not None,
                     type=click.IntRange(1), help="Tokens per window L."),
        click.option("--validation", default=8, show_default=True, type=click.IntRange(0),
                     help="Calibration windows kept out of H for a validation statistic "
                     "(OUT/validation), on which qdtk quantize --early-stop checks the "
                     "refinement; 0: none."),
        click.option("--gamma", default=0.25, show_default=True, type=float,
                     help="Visible prefix ratio: the first floor(gamma*L) tokens are never "
                     "masked."),
        click.option("--seed", default=0, show_default=True, type=int,
                     help="Seed of the window choice and of the mask draws (sequence i uses "
                     "seed+i)."),
        click.option("--mask/--no-mask", default=None,
                     help="Masked calibration (MCS), or plain text. Default: as the model is "
                     "used: masked for models that predict masked tokens (dLLMs, masked-LM "
                     "heads), plain for encoders without a head and causal LMs."),
        click.option("--mask-token-id", type=int, default=None,
                     help="Mask token id (default: config, tokenizer, or the LLaDA/Dream "
                     "default)."),
        click.option("--schedule", type=click.Choice(["linear", "cosine"]), default="linear",
                     show_default=True,
                     help="Mask probability at timestep t: t, or 1 - cos(pi t / 2)."),
        click.option("--timesteps", type=click.Choice(["grid", "random"]), default="grid",
                     show_default=True, help="t_i = (i+1)/N, or drawn at random as in LLaDA's "
                     "training ((1-eps) u + eps)."),
        click.option("--per-sequence", default=1, show_default=True, type=click.IntRange(1),
                     help="Timesteps (masked copies) per window."),
        click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]),
                     default="float32", show_default=True, help="Dtype the model runs in."),
        click.option("--batch-size", "chunk_size", default=8, show_default=True,
                     type=click.IntRange(1), help="Sequences per forward call (bounds memory)."),
        click.option("--offload", is_flag=True,
                     help="Keep the hidden states between blocks on disk, not in memory."),
        click.option("--accumulate", type=click.Choice(["float64", "float32"]),
                     default="float64", show_default=True,
                     help="Precision of sum x x^T: float64 throughout, or float32 within a batch "
                     "and float64 across batches (about twice as fast)."),
        click.option("--expert-weighting", type=click.Choice(["tokens", "weight", "weight2"]),
                     default="tokens", show_default=True,
                     help="Mixture of experts: how each token routed to an expert counts in the "
                     "expert's H: once, by its routing weight w, or by w^2 (the weight of its "
                     "error in the layer's output)."),
        click.option("--trust-remote-code", is_flag=True,
                     help="Allow the model's own code from its folder (LLaDA and Dream run "
                     "without it, on qdtk's native forward)."),
        model_code_option,
    ]
    if device:
        opts.append(click.option(
            "--device", default="cpu", show_default=True,
            help="Device the blocks run on (cpu, cuda, cuda:1); one block at a time."))
    return _compose(opts)


def capture_options_from(kw: dict):
    """CaptureOptions from the parsed `capture_options` (consumes their keys from kw)."""
    from qdtk.math.mcs import MaskOptions
    from qdtk.torch.capture import CaptureOptions

    mask = MaskOptions(
        gamma=kw.pop("gamma"), schedule=kw.pop("schedule"), timesteps=kw.pop("timesteps"),
        per_sequence=kw.pop("per_sequence"), seed=kw.pop("seed"), mask=kw.pop("mask"),
    )
    return CaptureOptions(
        n=kw.pop("n"), L=kw.pop("L"), mask=mask, mask_token_id=kw.pop("mask_token_id"),
        dtype=kw.pop("dtype"), device=kw.pop("device", "cpu"), chunk_size=kw.pop("chunk_size"),
        offload=kw.pop("offload"), accumulate=kw.pop("accumulate"),
        expert_weighting=kw.pop("expert_weighting"), validation=kw.pop("validation"),
        trust_remote_code=kw.pop("trust_remote_code"), model_code=kw.pop("model_code"),
    )


def _orders_list(ctx, param, value):
    try:
        return [int(o) for o in value.split(",") if o.strip()]
    except ValueError:
        raise click.BadParameter(f"{value!r}: a comma list of orders like 1,2,3") from None


def quantize_options(include: bool = True):
    """The options of the quantize stage (`qdtk quantize`, also offered by `qdtk run`); turn
    them into the stage's options dict with `quantize_options_from`.

    The defaults are the best measured end to end on MiniLM (held-out embedding cosine at the
    same real bits, 2.31, on every built-in held-out text): knapsack over the whole model at the
    cost of uniform order 2, H shrunk a quarter toward its diagonal, then the full refinement.
    The published method is `--abmp swap --rho 0.05 --bits 2 --refine none --shrink 0`.
    """
    opts = [
        click.option("--method", type=click.Choice(["daq", "gptq", "rtn"]), default="daq",
                     show_default=True,
                     help="daq (binary-coded, this project) or the baselines gptq / rtn "
                     "(asymmetric grid, group 128, float16 scale and zero)."),
        click.option("--bits", type=float, default=None,
                     help="daq with --abmp none/swap and gptq/rtn: an integer, the planes per "
                     "group (the grid bits for gptq/rtn), default 2. daq with --abmp knapsack: "
                     "the budget in bits per weight (see --count), default the cost of uniform "
                     "order 2 on the model's shapes (2.3125 on MiniLM)."),
        click.option("--abmp", type=click.Choice(["none", "swap", "knapsack"]),
                     default="knapsack", show_default=True,
                     help="Planes per 128-column group: none (uniform --bits), swap (the "
                     "published ABMP: rho*G lowest-salience groups to 1, as many highest to 3), "
                     "knapsack (least predicted error within the --bits budget). The paper's "
                     "method: --abmp swap --rho 0.05 --bits 2 --refine none."),
        click.option("--rho", type=click.FloatRange(0, 1), default=0.05, show_default=True,
                     help="Fraction of groups moved down and up by --abmp swap."),
        click.option("--count", type=click.Choice(["real", "planes"]), default="real",
                     show_default=True,
                     help="What the knapsack budget counts: real bits (sign planes and float16 "
                     "scales) or sign planes only (the papers' nominal bits)."),
        click.option("--budget-scope", type=click.Choice(["layer", "model"]), default="model",
                     show_default=True,
                     help="knapsack: one budget per layer, or one for the whole model with "
                     "layers weighted by their measured effect on the model output (a pre-pass "
                     "that runs the model; stored in OUT/orders.json)."),
        click.option("--orders", default="1,2,3", show_default=True, callback=_orders_list,
                     help="Orders (planes) the knapsack may give a group, from 1..4."),
        click.option("--iters", type=click.IntRange(0), default=5, show_default=True,
                     help="Alternating refinement iterations of the DAQ block solver (15 as "
                     "published; the group refinement and the sign passes after it make more "
                     "than 5 worth nothing, measured)."),
        click.option("--candidate-iters", type=click.IntRange(0), default=None,
                     help="knapsack: DAQ iterations of its candidate solves (every group alone "
                     "at every allowed order: the values that rank the orders; the sweep then "
                     "solves the chosen orders with --iters). Default: --iters. 1 takes about "
                     "a third of their time (they are about a fifth of the default's solve "
                     "at 8B scale) for slightly worse orders (measured: SmolLM2's perplexity "
                     "0.5-1.7% higher)."),
        click.option("--tau", type=float, default=2.0, show_default=True,
                     help="Salience z-score above which a weight's error is up-weighted."),
        click.option("--lam", type=float, default=3.0, show_default=True,
                     help="Error weight of the salient weights (1 elsewhere)."),
        click.option("--percdamp", type=click.FloatRange(min=0, min_open=True), default=0.01,
                     show_default=True, help="Damping of H as a fraction of its mean diagonal."),
        click.option("--shrink", type=click.FloatRange(0, 1, max_open=True), default=0.25,
                     show_default=True,
                     help="Fit on H shrunk toward its diagonal, (1 - a) H + a diag(H): the "
                     "off-diagonal correlations are what fits the calibration text (0.25 "
                     "lowered the error on every held-out text measured; 0: as published). "
                     "Errors are still reported on H."),
        click.option("--rotate", type=click.Choice(["auto", "none", "hadamard"]),
                     default="auto", show_default=True,
                     help="Rotate each Linear's input dimension before quantizing: hadamard "
                     "solves W Q against Q^T H Q, Q random signs times a block-diagonal "
                     "Hadamard matrix (incoherence processing, as in QuIP#); the packed model "
                     "applies x -> x Q online, unpack writes the weights back in the model's "
                     "basis. none: as published. auto: hadamard for daq, none for gptq/rtn."),
        click.option("--rotate-exclude", multiple=True, metavar="PATTERN",
                     help="With a rotation: leave these Linears in the input basis as given "
                     "(glob or 're:REGEX'; repeatable). Default: the attention's query, key and "
                     f"value Linears ({ROTATE_EXCLUDE[0]}), whose errors on the first token "
                     "(the attention sink) a rotation multiplies; 'none': rotate every Linear."),
        click.option("--rotate-seed", type=click.IntRange(0, 2**63 - 1), default=0,
                     show_default=True, help="Seed of the rotation's random signs."),
        click.option("--feedback", type=click.Choice(["block", "diagonal"]), default="block",
                     show_default=True,
                     help="How a solved block's error reaches the later columns: block (the "
                     "exact update for the whole 128-column block) or diagonal (GPTQ's "
                     "per-column rule, as published)."),
        click.option("--no-compensation", is_flag=True,
                     help="Solve every block alone, without GPTQ-style error feedback."),
        click.option("--refine", type=click.Choice(["none", "rows", "signs", "full", "all"]),
                     default="signs", show_default=True,
                     help="After the sweep, lower tr(D H D^T) on the full H: none (the paper), "
                     "rows (exact row-scale refit), signs (sign passes only, the scales kept), "
                     "full (rows and signs alternated), all (also the column scales; "
                     "slowest)."),
        click.option("--refine-rounds", type=click.IntRange(1), default=None,
                     help="Rounds of the refinement (each: rows, then signs; full and all end "
                     "with one more sign pass; signs: one pass each). Default: the mode's own "
                     "(rows 1, signs 4, full 4, all 4)."),
        click.option("--group-refine", type=click.IntRange(0), default=1, show_default=True,
                     help="Rounds of each 128-column group's refinement inside the sweep (exact "
                     "row-scale refit and sign pass on the group's own error metric, with "
                     "--feedback block; 0: off, as published)."),
        click.option("--early-stop/--no-early-stop", default=False, show_default=True,
                     help="Stop the refinement rounds (up to --refine-rounds) at the first that "
                     "does not lower the error on the validation statistic (capture "
                     "--validation), keeping the best; without one, refine as usual."),
        click.option("--backend", "--device", "backend",
                     type=click.Choice(["auto", "cpu", "reference", "cuda"]), default="auto",
                     show_default=True,
                     help="Where layers are solved: auto (a GPU when CuPy sees one, else cpu), "
                     "cpu (Numba kernels, LAPACK/BLAS), reference (the NumPy solver, slow), cuda "
                     "(cuSOLVER factor, CuPy compensation and refinement, Numba CUDA kernels, "
                     "ABMP's group solves batched; ABMP's knapsack stays on the CPU)."),
    ]
    if include:
        opts += [include_option, exclude_option]
    return _compose(opts)


def quantize_options_from(kw: dict, **run: Any) -> QuantizeOptions:
    """The quantize stage's QuantizeOptions from the parsed `quantize_options` (consumes their
    keys from kw, include/exclude excepted), with `run` (how it runs: cluster, num_cpus,
    trust_remote_code, model_code). Checked: a bad combination is an error here, before any
    solve."""
    from qdtk.math.daq import resolve_backend
    from qdtk.options import QuantizeOptions

    method, bits = kw.pop("method"), kw.pop("bits")
    daq = {
        "abmp": kw.pop("abmp"), "rho": kw.pop("rho"), "count": kw.pop("count"),
        "budget_scope": kw.pop("budget_scope"), "orders": kw.pop("orders"),
        "iters": kw.pop("iters"), "candidate_iters": kw.pop("candidate_iters"),
        "tau": kw.pop("tau"), "lam": kw.pop("lam"),
        "compensate": not kw.pop("no_compensation"), "feedback": kw.pop("feedback"),
        "refit": True, "refine": kw.pop("refine"), "refine_rounds": kw.pop("refine_rounds"),
        "early_stop": kw.pop("early_stop"), "group_refine": kw.pop("group_refine"),
        "shrink": kw.pop("shrink"),
    }
    backend = kw.pop("backend")
    options: dict[str, Any] = {"method": method, "bits": bits, "percdamp": kw.pop("percdamp"),
                              "rotate": kw.pop("rotate"), "rotate_seed": kw.pop("rotate_seed"),
                              "rotate_exclude": tuple(kw.pop("rotate_exclude")) or ROTATE_EXCLUDE}
    if options["rotate"] == "auto":
        options["rotate"] = "hadamard" if method == "daq" else "none"
    if options["rotate_exclude"] == ("none",):
        options["rotate_exclude"] = ()
    if method == "daq":
        options.update(daq, backend=resolve_backend(backend))
        if daq["abmp"] != "knapsack" and daq["budget_scope"] == "model":
            options["budget_scope"] = "layer"  # the model scope is the knapsack's only
    knapsack = method == "daq" and daq["abmp"] == "knapsack"
    if bits is None:
        options["bits"] = None if knapsack else 2  # None: the budget of uniform order 2
    return QuantizeOptions(**options, **run)
