"""Band attention: a faster variant of dt_grpo.py's Decision Transformer for rollouts, not part of the paper's method.

Sliding-window attention (as in Longformer or Mistral): the input may be any number of steps, and every token
attends to itself and the 3K-1 tokens before it, in every layer. The action at step t then depends on the last
n_layer * K steps (the receptive field grows by 3K-1 tokens per layer), and a rollout can keep each layer's keys and
values of the last 3K-1 tokens (a KV cache) and feed only the 3 new tokens of a step: the same function as the
full forward, several times fewer FLOPs per step. Made by `pretrain.py --attention band`; every online script
takes its checkpoints (dt_grpo.make_model picks the class).
"""

import numpy as np
import torch

import dt_grpo


class BandDecisionTransformer(dt_grpo.DecisionTransformer):
    def __init__(self, cfg):
        super().__init__(cfg)
        self.input_steps = cfg.n_layer * cfg.context_len + 1  # W: the receptive field plus the step itself

    def allowed(self, rel):
        """Causal and within the band: the token itself and the 3K-1 before it."""
        return (rel >= 0) & (rel < 3 * self.context_len)

    def outputs_needed(self, block, n, n_tokens):
        """The last block's 3n - 2 tokens, and each earlier block one band more (the keys of the next block)."""
        need = 3 * n - 2 + (len(self.blocks) - 1 - block) * (3 * self.context_len - 1)
        return need if need < n_tokens else None

    # The KV cache: per layer, keys and values of the last 3K-1 tokens, up to the last state token (the action taken
    # there is fed with the next step, so that every step is one forward of 3 tokens).
    def cache_from(self, win):
        """The cache after the steps of `win` (B, P, ...), P >= input_steps - 1 so that it is exact."""
        x = self.embed(win["rtg"], win["states"], win["actions"], win["timesteps"])[:, :-1]  # up to s_P
        keys_ok = win["valid"].repeat_interleave(3, dim=1)[:, :-1]
        mask, W = self.attn_mask(x.shape[1], x.shape[1], keys_ok), 3 * self.context_len - 1
        kv = []
        for blk in self.blocks:
            x, (k, v) = blk(x, mask)
            kv.append((k[:, :, -W:], v[:, :, -W:]))
        return dict(kv=kv, ok=keys_ok[:, -W:])

    def step_cached(self, cache, prev_action, prev_t, prev_valid, rtg, state, t):
        """The Gaussian (B, act) at state token s_t, from the cache and the 3 new tokens a_{t-1}, R_t, s_t (inputs
        (B, ...); prev_valid is False where a_{t-1} is padding). The cache moves on by those tokens, in place."""
        te = (lambda steps: self.embed_t(steps)) if self.embed_t is not None else (lambda steps: 0.0)  # noqa: E731
        tokens = torch.stack([self.embed_a(prev_action) + te(prev_t), self.embed_R(rtg) + te(t),
                              self.embed_s(state) + te(t)], 1)
        x = self.drop(self.ln_in(tokens))  # (B, 3, D)
        ok = torch.cat([cache["ok"], prev_valid[:, None], torch.ones_like(cache["ok"][:, :2])], 1)
        mask = self.attn_mask(3, ok.shape[1], ok)
        for i, blk in enumerate(self.blocks):
            x, (k, v) = blk(x, mask, n_out=1 if i == len(self.blocks) - 1 else None, past=cache["kv"][i])
            cache["kv"][i] = (k[:, :, 3:], v[:, :, 3:])  # the oldest 3 tokens leave the band
        cache["ok"] = ok[:, 3:]
        mean, pre_std = self.head(self.ln_out(x[:, -1])).chunk(2, dim=-1)
        lo, hi = dt_grpo.LOG_STD_MIN, dt_grpo.LOG_STD_MAX
        return mean, lo + 0.5 * (hi - lo) * (torch.tanh(pre_std) + 1)

    # dt_grpo.run_lanes and the update through the cache and one sequence per lane
    def rollout_start(self, prefix):
        """The cache after the prefix; its rows follow the live lanes (`rows`), dropped as lanes end."""
        return dict(cache=self.cache_from(prefix), rows=np.arange(prefix["states"].shape[0]))

    def rollout_step(self, state, buf, idx, live, j):
        """One forward of step j's 3 new tokens a_{j-1}, R_j, s_j against the cache: the full forward's numbers."""
        if len(live) < len(state["rows"]):
            keep = torch.as_tensor(np.searchsorted(state["rows"], live), device=idx.device)
            state["cache"] = dict(kv=[(k[keep], v[keep]) for k, v in state["cache"]["kv"]],
                                  ok=state["cache"]["ok"][keep])
            state["rows"] = live
        s = self.input_steps - 1 + j
        return self.step_cached(state["cache"], buf["actions"][idx, s - 1], buf["timesteps"][idx, s - 1],
                                buf["valid"][idx, s - 1], buf["rtg"][idx, s], buf["states"][idx, s],
                                buf["timesteps"][idx, s])

    def action_inputs(self, buf, n_steps):
        """Each lane's first W - 1 + n_steps steps, (B, W - 1 + n_steps, ...): one sequence holds every action's
        receptive field, so the update runs one forward per lane."""
        return {k: v[:, : self.input_steps - 1 + n_steps] for k, v in buf.items()}

    def action_dists(self, inputs):
        n = inputs["states"].shape[1] - (self.input_steps - 1)
        return self(inputs["rtg"], inputs["states"], inputs["actions"], inputs["timesteps"], inputs["valid"], last=n)
