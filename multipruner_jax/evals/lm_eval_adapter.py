"""An lm-evaluation-harness language model backed by our JAX ``CausalLM``.

``JaxLM`` subclasses lm-eval's ``TemplateLM``, so contexts and continuations are encoded by
lm-eval's own code (trailing context spaces move to the continuation, the pair is encoded whole
and split). The rest follows lm-eval's ``hf`` model (``HFLM``) exactly, so results are
comparable with it:

* ``tok_encode`` adds special tokens as the tokenizer does by default unless ``add_bos_token``
  says otherwise, and not when the text already starts with the BOS string;
* the loglikelihood prefix token (empty contexts, rolling windows) is BOS, or EOS without one;
* a request's input is ``(context + continuation)[-(max_length + 1):][:-1]`` (left truncation),
  its last ``len(continuation)`` positions are scored;
* ``max_length`` defaults to the config's ``max_position_embeddings``;
* rolling log-likelihoods use lm-eval's disjoint rolling windows with one token of context.

Scoring is ``loglik.ContinuationScorer``: batched, bucketed, jitted, sharded over the mesh's
"data" axis, fp32 log-probabilities. Only log-likelihood requests are served.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax.numpy as jnp
from jax.sharding import Mesh
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import has_bos_prefix

from models.decoder import CausalLM
from multipruner_jax.base import mesh as mesh_lib
from multipruner_jax.evals.loglik import ContinuationScorer, Progress
from multipruner_jax.storage import model_loader


class JaxLM(TemplateLM):
    """lm-eval ``LM`` for ``model`` and its HF ``tokenizer``; see the module docstring."""

    backend = "causal"

    def __init__(
        self,
        model: CausalLM,
        tokenizer,
        *,
        mesh: Mesh | None = None,
        batch_size: int = 32,
        max_length: int | None = None,
        add_bos_token: bool | None = None,
        token_chunk: int = 512,
        progress: Progress | None = None,
    ):
        super().__init__()
        if max_length is not None and max_length < 1:
            raise ValueError(f"max_length={max_length}: expected a positive token count")
        self.model = model
        self.tokenizer = tokenizer
        self.add_bos_token = add_bos_token
        self._max_length = max_length or model.spec.max_position_embeddings
        self.scorer = ContinuationScorer(
            model, mesh=mesh, batch_size=batch_size, token_chunk=token_chunk, progress=progress
        )

    @classmethod
    def from_path(
        cls,
        path: str,
        *,
        dtype: jnp.dtype = jnp.float32,
        mesh_shape: tuple[int, ...] | None = None,
        **kwargs,
    ) -> JaxLM:
        """Load an HF directory (dense or compact export) or our checkpoint onto a mesh."""
        mesh = mesh_lib.make_mesh(mesh_shape)
        sharding_for = functools.partial(mesh_lib.param_sharding, mesh)
        model = model_loader.load_model(path, dtype, sharding_for)
        return cls(model, model_loader.load_tokenizer(path), mesh=mesh, **kwargs)

    # -- tokenisation (as HFLM) ---------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def compiles(self) -> int:
        return self.scorer.compiles

    def tok_encode(
        self,
        string: str,
        add_special_tokens: bool | None = None,
        left_truncate_len: int | None = None,
        **kwargs,
    ) -> list[int]:
        special = add_special_tokens if add_special_tokens is not None else self.add_bos_token
        options = {} if special is None else {"add_special_tokens": special}
        if add_special_tokens is None and has_bos_prefix(
            string, self.tokenizer.decode(self.prefix_token_id)
        ):
            options["add_special_tokens"] = False
        encoding = self.tokenizer.encode(string, **options)
        if left_truncate_len:
            encoding = encoding[-left_truncate_len:]
        return encoding

    def tok_decode(self, tokens: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    # -- scoring ------------------------------------------------------------------------------

    def _loglikelihood_tokens(
        self,
        requests: list[tuple[tuple[str, str] | None, list[int], list[int]]],
        disable_tqdm: bool = False,
        **kwargs,
    ) -> list[tuple[float, bool]]:
        """``(log P(continuation | context), continuation is greedy)`` per encoded request."""
        inputs, targets = [], []
        for i, (_, context, continuation) in enumerate(requests):
            if not context or not continuation or len(continuation) > self.max_length:
                raise ValueError(
                    f"loglikelihood request {i}: context of {len(context)} and continuation of "
                    f"{len(continuation)} tokens; expected both non-empty and the continuation "
                    f"at most max_length={self.max_length}"
                )
            inputs.append((context + continuation)[-(self.max_length + 1) :][:-1])
            targets.append(continuation)
        logprob, greedy = self.scorer.score(inputs, targets)
        results = [(float(lp), bool(g)) for lp, g in zip(logprob, greedy, strict=True)]
        for (key, _, _), answer in zip(requests, results, strict=True):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, answer)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Total log-likelihood of each request's text over lm-eval's rolling windows."""
        windows, owner = [], []
        for r, request in enumerate(requests):
            (text,) = request.args
            for context, continuation in map(
                lm_utils.make_disjoint_window,
                lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(text),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                ),
            ):
                windows.append((None, context, continuation))
                owner.append(r)
        scores = self._loglikelihood_tokens(windows) if windows else []
        totals = [0.0] * len(requests)
        for r, (logprob, _) in zip(owner, scores, strict=True):
            totals[r] += logprob
        for request, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        tasks = sorted({str(r.task_name) for r in requests}) if requests else []
        raise NotImplementedError(
            f"JaxLM scores log-likelihoods only; the generative task(s) {tasks} need "
            "generate_until, which it does not implement (use multiple_choice, loglikelihood "
            "or loglikelihood_rolling tasks)"
        )
