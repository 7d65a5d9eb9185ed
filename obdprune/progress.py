"""Progress bars (tqdm), silent when disabled or when stderr is not wanted."""
from __future__ import annotations

from tqdm.auto import tqdm


class _NullBar:
    def update(self, n: int = 1) -> None: ...
    def set_postfix(self, **kw) -> None: ...
    def close(self) -> None: ...


def progress_bar(total: int, desc: str, enabled: bool = True):
    if not enabled:
        return _NullBar()
    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, mininterval=0.5)
