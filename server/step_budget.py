"""A step's token budget from measured step times (``--target-step-ms``): a pure policy.

A request that arrives while a step runs waits for that step before it can join the batch, and
every running request waits for it before its next token. ``--max-tokens-per-step`` bounds a step
in tokens, which is a different time on every machine and at every context length; with
``--target-step-ms`` a step's prompt tokens are also sized so that the step is predicted to end
within the target. The model, fitted by least squares over the recent steps:

    seconds ~= w0 + w1 * decode_tokens + w2 * prefill_tokens

and the next step's prompt tokens (its decode tokens d known before scheduling):

    prefill = floor((target - w0 - w1 * d) / w2)

clamped to [MIN_PREFILL_TOKENS, max_tokens - d]. Decodes always run (the budget covers every
running decode), and a prompt always gets at least MIN_PREFILL_TOKENS a step, so every request
still progresses: a slow machine gets more, shorter steps, never a stall. The fit keeps the last
WINDOW steps with prompt tokens and the last WINDOW without, so a long stretch of decode-only steps
does not erase what prefill costs; the fit's sums are updated as steps come and go, so each step
costs a few operations whatever the window (about 10 us). Until MIN_PREFILL_STEPS steps with
prompt tokens are seen, or while the fit says prompt tokens cost next to nothing (all the cap
allows adding under FREE_SHARE of the target), the budget is ``max_tokens`` unchanged.

A least-squares fit is not robust: one step stalled by something else (a garbage collection, a
page fault storm, a noisy neighbour: 219 ms among 7-40 ms steps was seen) could tilt the prompt
tokens' cost negative and hold the budget at the cap for a whole window. So a step slower than
OUTLIER times its prediction is held back; if the next step is such an outlier too, the machine
has changed, and both enter the fit (one step late); else the held one is dropped.
"""

from __future__ import annotations

from collections import deque

MIN_PREFILL_TOKENS = 16  # a prompt's least progress per step under any target
MIN_PREFILL_STEPS = 4  # steps with prompt tokens seen before the fit sizes anything
WINDOW = 64  # steps kept of each kind (with and without prompt tokens)
RIDGE = 1e-9  # keeps the normal equations solvable when a feature has not varied
FREE_SHARE = 0.01  # prompt tokens up to the cap predicted to add less than this share of the target: free
OUTLIER = 4.0  # a step this many times slower than predicted is held back as a possible stall


class StepBudget:
    """``tokens(decode_tokens)``: the next step's token budget; ``observe(...)`` after each step."""

    def __init__(self, target_seconds: float, max_tokens: int):
        assert target_seconds > 0 and max_tokens > 0
        self.target, self.max_tokens = target_seconds, max_tokens
        self._with_prefill: deque[tuple[float, float, float]] = deque()  # (d, p) / max_tokens, seconds ...
        self._decode_only: deque[tuple[float, float, float]] = deque()
        # ... and the normal equations' sums over both: X^T X [i][j] and X^T y [i]
        self._xtx = [[0.0] * 3 for _ in range(3)]
        self._xty = [0.0] * 3
        self._weights: tuple[float, float, float] | None = None  # refitted after each observation
        self._held: tuple[int, int, float] | None = None  # an outlier step not yet in the fit

    def observe(self, decode_tokens: int, prefill_tokens: int, seconds: float) -> None:
        """One finished step: its decode tokens (rows and drafts), prompt tokens and wall time."""
        expected = self.predict(decode_tokens, prefill_tokens)
        if expected is not None and expected > 0 and seconds > OUTLIER * expected:
            if self._held is None:  # a stall, until the next step says otherwise
                self._held = (decode_tokens, prefill_tokens, seconds)
                return
            self._add_step(*self._held)  # two in a row: the machine changed
        self._held = None
        self._add_step(decode_tokens, prefill_tokens, seconds)

    def _add_step(self, decode_tokens: int, prefill_tokens: int, seconds: float) -> None:
        # both features scaled by max_tokens, which bounds them, so that the ridge weighs them alike
        row = (decode_tokens / self.max_tokens, prefill_tokens / self.max_tokens, seconds)
        window = self._with_prefill if prefill_tokens else self._decode_only
        window.append(row)
        self._add(row, 1.0)
        if len(window) > WINDOW:
            self._add(window.popleft(), -1.0)
        self._weights = self._fit() if len(self._with_prefill) >= MIN_PREFILL_STEPS else None

    def _add(self, row: tuple[float, float, float], sign: float) -> None:
        x = (1.0, row[0], row[1])
        for i in range(3):
            self._xty[i] += sign * x[i] * row[2]
            for j in range(3):
                self._xtx[i][j] += sign * x[i] * x[j]

    def _fit(self) -> tuple[float, float, float]:
        """Least squares with a small ridge: the 3x3 normal equations solved by Cramer's rule."""
        ridge = RIDGE * (len(self._with_prefill) + len(self._decode_only))
        m = [[self._xtx[i][j] + (ridge if i == j else 0.0) for j in range(3)] for i in range(3)]
        v, det = self._xty, _det(m)
        w = [_det([[v[r] if c == k else m[r][c] for c in range(3)] for r in range(3)]) / det for k in range(3)]
        return w[0], w[1] / self.max_tokens, w[2] / self.max_tokens

    def predict(self, decode_tokens: int, prefill_tokens: int) -> float | None:
        """Seconds the fit expects such a step to take (None: no fit yet)."""
        if self._weights is None:
            return None
        w0, w1, w2 = self._weights
        return float(w0 + w1 * decode_tokens + w2 * prefill_tokens)

    def tokens(self, decode_tokens: int) -> int:
        """The budget of a step that starts with ``decode_tokens`` decodes: those, and the prompt
        tokens that fit the target (see the module's docstring); never above ``max_tokens``."""
        cap = self.max_tokens - decode_tokens
        if self._weights is None or cap <= MIN_PREFILL_TOKENS:
            return self.max_tokens
        w0, w1, w2 = self._weights
        if not w2 * cap > FREE_SHARE * self.target:  # prompt tokens look free: shrinking them gains nothing
            return self.max_tokens
        prefill = (self.target - w0 - w1 * decode_tokens) / w2
        return decode_tokens + int(min(cap, max(MIN_PREFILL_TOKENS, prefill)))


def _det(m: list[list[float]]) -> float:
    return (m[0][0] * (m[1][1] * m[2][2] - m[1][2] * m[2][1]) - m[0][1] * (m[1][0] * m[2][2] - m[1][2] * m[2][0])
            + m[0][2] * (m[1][0] * m[2][1] - m[1][1] * m[2][0]))
