"""Log-probs of the labelled tokens: the one place where the trainer runs a model's LM head.

Every log-prob of the trainer comes from a `Scorer` (the run's layout, precision and LM head): the
SPIN policy loss, the reference log-probs, the SFT loss and the validation numbers. The backbone runs over the whole batch [S, T], but the LM
head only over the N positions whose label the loss mask counts (the response tokens, EOS
included), so prompt and padding positions never produce logits. With SPIN's prompts, a quarter of
a sequence on the benchmark shape, that is the same share of the head's matmul, of its [N, V]
logits and of the loss's work. Both heads (`Scorer.head`) run inside the model's own
forward, as the output embedding's call, so that FSDP's and tensor parallelism's hooks run as
usual:

Mixed precision is FSDP's cast in every layout (parallel/precision.py): a `Scorer` of a mixed
precision needs a model under FSDP, on a data-parallel axis of one rank if need be.

- "logits": a pre-hook on the output embedding compacts the hidden states to the labelled
  positions [N, H]; the head writes their logits [N, V] (under tensor parallelism this rank's vocab
  shard [N, V/tp]) and `token_logprobs` (vocab-parallel over the tp group) reads them.
- "fused" (the default on CUDA): for the duration of the call, the output embedding's forward is
  redirected (as TRL's and verl's "forward redirection") to spin_kernels' fused head, which takes
  the hidden states and `head.weight` and never materializes logits: `linear_token_logprobs` on the
  compacted [N, H] rows (SFT loss, reference and validation log-probs), or for the SPIN policy
  loss `linear_spin_loss` on the [2b, T, H] pair batch, whose gradients are formed in the forward.
  Memory: no [N, V] logits nor their gradient, only one chunk's (at most 1 GiB) and, for a bf16
  weight, an fp32 accumulator of d weight (4·V/tp·H bytes); the loss's preformed d hidden [2b, T, H]
  and d weight are held from the forward to the backward. FLOPs: the policy loss 6·N·H·V, as the
  logits path; the per-token function 2·N·H·V under no_grad and 8·N·H·V with a gradient (its
  backward recomputes the logits). spin_kernels/loss/linear.py's docstring has the details. Being
  the module's own call, FSDP2's
  root pre-forward has unsharded `head.weight` (the bf16 unsharded parameter under mixed
  precision), the output reaches the root's pre-backward hook, and the weight's gradient lands on
  the unsharded parameter for the post-backward reduce-scatter. Tied embeddings share that one
  parameter. Under tensor parallelism the head's input hook hands the forward the replicated
  hidden states as a DTensor and its weight is the vocab-sharded DTensor: the fused head takes
  their local tensors with `process_group=ctx.tp_group` (d hidden summed over the group, which is
  the all-reduce the logits path's DTensor backward does), and its output goes back wrapped as the
  Shard(-1) DTensor the plan's output hook turns into a local tensor (parallel/tp_plan.py).
"""
import warnings
from dataclasses import dataclass

import torch

from spin_kernels.loss import linear_spin_loss, linear_token_logprobs, spin_loss_from_logps, token_logprobs

from .lm_head import compacted_input, fused_output, output_embedding, redirected_head
from .packed_attention import packed_forward
from .packed_scoring import packed_pair_loss, packed_sequence_logps
from .packing import PackedPairs
from .parallel.mesh import ParallelContext
from .parallel.precision import Precision


def default_head(device_type):
    """The head's default: the fused head on CUDA, the logits elsewhere (the tested CPU path)."""
    return "fused" if device_type == "cuda" else "logits"


@dataclass
class LabelledLogps:
    token_logps: torch.Tensor   # [N] float32 log-prob of each labelled token, row-major order
    rows: torch.Tensor          # [N] the batch row of each
    num_rows: int

    def sequence_sums(self):
        """[S] float32 sum per row (differentiable); a row with no labelled token gives 0."""
        sums = self.token_logps.new_zeros(self.num_rows)
        return sums.index_add(0, self.rows, self.token_logps)


@dataclass
class Scorer:
    """The trainer's forwards: `ctx`'s layout, `precision` and the LM `head` ("fused" or "logits")."""
    ctx: ParallelContext
    precision: Precision = Precision()
    head: str = "logits"
    packing: str | None = None   # packed_scoring.choose_packing's layout (pair and SFT batches); None: padded

    def __post_init__(self):
        assert self.ctx.dp_mesh is not None or not self.precision.mixed, \
            "mixed precision is FSDP's cast: setup_parallel(..., fsdp_alone=True) and parallelize_model"

    def _run(self, model, batch):
        with warnings.catch_warnings():
            # Under TP the LM head returns its local vocab shard, a view (DTensor.to_local), which FSDP
            # warns about in case the caller modifies it in place in the forward. Nothing does: the
            # loss's in-place write (inplace_backward) is its own gradient, in the backward, after
            # FSDP's pre-backward hook has run on it.
            warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(.*\) returned a view tensor")
            if isinstance(batch, PackedPairs):
                return packed_forward(model, batch).logits
            return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits

    def labelled_logps(self, model, batch, *, inplace_backward=False):
        """Log-probs of the labelled tokens of `batch` (a data.Batch) under `model`.

        `inplace_backward=True` lets the loss's gradient overwrite the logits' memory (nothing else
        reads them after the loss; the fused head has no logits).
        """
        ctx = self.ctx
        num_rows, width = batch.labels.shape
        positions = batch.loss_mask.reshape(-1).nonzero().squeeze(1)   # [N]
        labels = batch.labels.reshape(-1).index_select(0, positions)    # [N]
        head = output_embedding(model)
        with compacted_input(head, positions):
            if self.head == "fused":
                def compute(hidden, weight, bias):
                    return linear_token_logprobs(hidden, weight, labels, bias=bias, process_group=ctx.tp_group)

                with redirected_head(head, ctx, compute) as produced:
                    logps = fused_output(model, produced, self._run(model, batch))
            else:
                logits = self._run(model, batch)
                assert logits.shape[0] == positions.shape[0], (tuple(logits.shape), positions.shape)
                logps = token_logprobs(logits, labels, process_group=ctx.tp_group, inplace_backward=inplace_backward)
        return LabelledLogps(logps, torch.div(positions, width, rounding_mode="floor"), num_rows)

    @torch.no_grad()
    def sequence_logps(self, model, batch):
        """[2b] masked sums of the response log-probs (EOS included) of a pair batch, float32, no
        gradient: the reference's numbers, by `pair_loss`'s own arithmetic (the fused head: its op,
        with its chunks and its summation order), so that π − ref is exactly 0 at θ_t."""
        if isinstance(batch, PackedPairs):
            return packed_sequence_logps(self, model, batch)
        if self.head == "logits":
            return self.labelled_logps(model, batch).sequence_sums()
        unused = torch.zeros(batch.labels.shape[0], device=batch.labels.device)
        return self.pair_loss(model, batch, unused, beta=1.0, loss_type="sigmoid").policy_logps

    def pair_loss(self, model, batch, ref_logps, *, beta, loss_type):
        """The SPIN loss (a SpinLossOutput: loss, metrics, per-sequence log-probs and rewards) of a
        [2b]-row pair batch (rows [0, b) actual, [b, 2b) generated) against the reference's [2b] sums."""
        if isinstance(batch, PackedPairs):
            return packed_pair_loss(self, model, batch, ref_logps, beta=beta, loss_type=loss_type)
        if self.head == "logits":
            # Nothing else reads the logits after the loss: their gradient can take their memory.
            policy = self.labelled_logps(model, batch, inplace_backward=True).sequence_sums()
            return spin_loss_from_logps(policy, ref_logps, beta=beta, loss_type=loss_type)
        results = []

        def compute(hidden, weight, bias):   # hidden [2b, T, H]: the fused head compacts the labelled rows
            out = linear_spin_loss(hidden, weight, batch.labels, ref_logps, bias=bias, loss_mask=batch.loss_mask,
                                   beta=beta, loss_type=loss_type, process_group=self.ctx.tp_group)
            results.append(out)
            return out.loss.reshape(1)   # a dim to be the plan's Shard(-1) under --tp

        with redirected_head(output_embedding(model), self.ctx, compute) as produced:
            loss = fused_output(model, produced, self._run(model, batch))
        return results[0]._replace(loss=loss[0])
