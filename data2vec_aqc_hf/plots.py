"""PNG plots of training curves (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path


def plot_curves(history: list[dict], panels: list[tuple[str, list[str]]], path: str | Path, title: str,
                step_key: str = "step") -> Path | None:
    """One panel per `(y label, keys)`; each key is drawn from the history entries that have it. Panels with no data
    are left out; returns None (and writes nothing) when no panel has data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(label, [k for k in keys if any(k in h for h in history)]) for label, keys in panels]
    panels = [(label, keys) for label, keys in panels if keys]
    if not panels:
        return None
    columns = min(len(panels), 2 if len(panels) == 4 else 3)
    rows = -(-len(panels) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(6 * columns, 3.8 * rows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax, (label, keys) in zip(axes.flat, panels):
        for key in keys:
            points = [(h[step_key], h[key]) for h in history if key in h and step_key in h]
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="." if len(points) < 30 else None,
                    label=key)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(label)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
