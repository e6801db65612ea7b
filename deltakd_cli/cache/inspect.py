"""`deltakd inspect`: a cache's summary, its verification, and one example decoded."""

from __future__ import annotations

import json
from typing import Any

from rich.markup import escape
from rich.table import Table

from deltakd_cli.cache.options import InspectOptions
from deltakd_cli.cache.reader import CachedExample, CacheReader
from deltakd_cli.console import console
from deltakd_cli.errors import DeltakdError
from deltakd_cli.method.targets import FIELD_KIND, PER_POSITION_FIELDS
from deltakd_cli.options import check


def summary(reader: CacheReader) -> dict[str, Any]:
    record = reader.record
    return {
        "path": reader.path,
        "format_version": record.format_version,
        "examples": record.counts["examples"],
        "tokens": record.counts["tokens"],
        "response_tokens": record.counts["response_tokens"],
        "truncated_examples": record.counts["truncated"],
        "top_k": record.top_k,
        "vocab_size": record.vocab_size,
        "selection": record.selection,
        "tail_rule": record.tail_rule,
        # the sampled tail (format 5): draws per position, their seed and proposal, temperature
        "tail_samples": record.tail_samples,
        "sample_seed": record.sample_seed,
        "proposal": record.proposal,
        "temperature": record.temperature,
        "alpha": record.alpha,
        "has_student": record.has_student,
        # (gamma, alpha) points of the KD-to-Delta grid and their bytes; null without a grid
        "grid": record.grid and {**record.grid, "points": record.grid_points},
        "precision": record.precision,
        "shards": len(record.shards),
        "bytes": record.bytes,
        "bytes_per_response_token": record.bytes_per_response_token,
        "provenance": record.provenance,
        "tool": record.tool,
    }


TABLE_POSITIONS = 8  # target positions `inspect --example` shows without --positions
TABLE_IDS = 4  # kept ids shown per position in the table (all of them in the JSON)


def example_json(
    example: CachedExample, vocabulary: list[str | None], limit: int | None = None
) -> dict[str, Any]:
    """The documented per-example JSON: position p is the prediction of input_ids[p + 1]. Token
    ids come with their text from the cache's own vocabulary (`tokens`, `ids_text`); `limit`
    keeps the first target positions only."""
    targets = example.targets
    positions = []
    for row, position in enumerate(example.target_positions[:limit]):
        entry: dict[str, Any] = {"position": int(position)}
        for name in PER_POSITION_FIELDS:
            values = getattr(targets, name)
            if values is not None:
                value = values[row]
                entry[name] = value.tolist() if FIELD_KIND[name] != "scalar" else float(value)
                if FIELD_KIND[name] in ("ids", "sample_ids"):
                    entry[name + "_text"] = [_text(vocabulary, i) for i in entry[name]]
        if targets.sample_counts is not None:  # only the used slots: (text, count) per draw
            entry["draws"] = [
                {"id": int(i), "text": _text(vocabulary, int(i)), "count": int(c)}
                for i, c in zip(targets.sample_ids[row], targets.sample_counts[row], strict=True)
                if c > 0
            ]
        positions.append(entry)
    input_ids = example.input_ids.tolist()
    return {
        "example_index": example.example_index,
        "input_ids": input_ids,
        "tokens": [_text(vocabulary, i) for i in input_ids],
        "target_mask": example.target_mask.astype(int).tolist(),
        "target_positions": len(example.target_positions),
        "positions": positions,
    }


def _text(vocabulary: list[str | None], token_id: int) -> str:
    text = vocabulary[token_id] if 0 <= token_id < len(vocabulary) else None
    return text if text is not None else f"<{token_id}>"


def _print_example(decoded: dict[str, Any]) -> None:
    """One example for a reader: its tokens as text, then per target position the token that
    follows and the first kept ids with the tuned teacher's log-probs."""
    tokens = decoded["tokens"]
    console.print(
        f"[bold]example {decoded['example_index']}[/bold]: {len(tokens)} tokens, "
        f"{decoded['target_positions']} target positions"
    )
    console.print(escape("".join(tokens)), soft_wrap=True)
    table = Table(show_header=True)
    drawn = any("draws" in entry for entry in decoded["positions"])
    columns = ["position", "next token", f"kept ids (tuned log-prob), first {TABLE_IDS}"]
    if drawn:
        columns.append(f"drawn tail ids (count), first {TABLE_IDS}")
    for column in columns:
        table.add_column(column)
    for entry in decoded["positions"]:
        following = tokens[entry["position"] + 1]
        kept = zip(entry["ids_text"], entry["tuned_logprobs"], strict=True)
        shown = "  ".join(f"{text!r} {logprob:.2f}" for text, logprob in list(kept)[:TABLE_IDS])
        row = [str(entry["position"]), repr(following), escape(shown)]
        if drawn:
            draws = entry.get("draws", [])[:TABLE_IDS]
            row.append(escape("  ".join(f"{d['text']!r} x{d['count']}" for d in draws)))
        table.add_row(*row)
    console.print(table)
    left = decoded["target_positions"] - len(decoded["positions"])
    if left:
        console.print(f"({left} more target positions: --positions N, or --json)")


def inspect_cache(options: InspectOptions) -> dict[str, Any]:
    """`deltakd inspect`; returns what --json prints (the summary, or the example decoded)."""
    check(options)
    path = options.cache
    reader = CacheReader(path)
    if options.positions is not None and options.example is None:
        raise DeltakdError("--positions needs --example (the example whose positions to show)")
    if options.example is not None:
        limit = options.positions or (None if options.json else TABLE_POSITIONS)
        reader.check_structure()  # zarr reads a missing chunk back as zeros: refuse, never show
        example = reader.find_example(options.example)
        decoded = example_json(example, reader.vocabulary(), limit)
        if options.json:
            print(json.dumps(decoded))
        else:
            _print_example(decoded)
        return decoded
    report = summary(reader)
    damaged: list[str] = []
    if options.verify:
        reader.check_structure()
        damaged = reader.verify()
        report["verified"] = not damaged
        report["damaged_shards"] = damaged
    if options.json:
        print(json.dumps(report, indent=2))
    else:
        _print_table(report)
    if damaged:
        raise DeltakdError(f"{path}: damaged shards: {', '.join(damaged)}")
    if options.verify and not options.json:
        console.print(f"[green]verified[/green]: all {report['shards']} shards match the manifest")
    return report


def _grid_text(grid: dict[str, Any] | None) -> str:
    if not grid:
        return "none"
    points = " ".join(f"({gamma:g}, {alpha:g})" for gamma, alpha in grid["points"])
    return (
        f"(gamma, alpha) {points}: {grid['bytes_per_response_token']} bytes / response token "
        f"({grid['stored_bytes_per_response_token']:.1f} stored)"
    )


def _print_table(report: dict[str, Any]) -> None:
    table = Table(title=f"deltakd cache {report['path']}", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    rows = [
        ("examples", f"{report['examples']:,} ({report['truncated_examples']} truncated)"),
        ("response tokens", f"{report['response_tokens']:,}"),
        ("top-k / vocabulary", f"{report['top_k']} / {report['vocab_size']:,}"),
        ("selection, tail", f"{report['selection']}, {report['tail_rule']}"),
        (
            "student log-probs",
            f"yes (alpha {report['alpha']})" if report["has_student"] else "no",
        ),
        ("kd-to-delta grid", _grid_text(report["grid"])),
        (
            "sampled tail",
            f"{report['tail_samples']} draws per position from {report['proposal']} (seed "
            f"{report['sample_seed']}, temperature {report['temperature']:g})"
            if report["tail_samples"]
            else "none (tail bucket)",
        ),
        ("precision", report["precision"]),
        ("shards", str(report["shards"])),
        ("stored bytes", f"{report['bytes']:,}"),
        ("bytes / response token", f"{report['bytes_per_response_token']:.1f}"),
    ]
    for role in ("teacher_base", "teacher_tuned", "student"):
        identity = report["provenance"].get(role)
        if identity:
            rows.append((role, f"{identity['spec']} (weights {identity['weights_sha256'][:12]})"))
    data = report["provenance"]["data"]
    rows.append(("data", f"{data.get('spec')} (sha256 {data['sha256'][:12]})"))
    template = report["provenance"]["template"]
    rows.append(
        (
            "template",
            f"{template['name']} from {template['from']} (responses end with "
            f"{template['eos_token']}; chat turns: {template['train_turns']})",
        )
    )
    for name, value in rows:
        table.add_row(name, value)
    console.print(table)
