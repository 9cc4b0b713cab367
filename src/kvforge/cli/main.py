"""The ``kvforge`` command line."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from kvforge.blocks import HASH_ALGOS, BlockHasher, LoRA, event_hash, validate_cache_salt
from kvforge.errors import KvforgeError
from kvforge.tokenize import PromptTokenizer, TokenizedPrompt

app = typer.Typer(
    name="kvforge",
    help="Exact KV-cache reuse analysis for multi-agent LLM pipelines (vLLM-identical hashes).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


# Options every command shares: one definition each, so their help stays the same everywhere.
_ALGO_HELP = f"The engines' --prefix-caching-hash-algo: {', '.join(HASH_ALGOS)}."
AlgoOpt = Annotated[str, typer.Option("--algo", help=_ALGO_HELP)]
BlockSizeOpt = Annotated[
    int, typer.Option("--block-size", min=1, help="The engines' --block-size.")
]
HashSeedOpt = Annotated[
    str | None, typer.Option("--hash-seed", help="The engines' PYTHONHASHSEED (omit when unset).")
]
TokenizerOpt = Annotated[
    str | None,
    typer.Option("--tokenizer", help="Local tokenizer.json (default: the shipped Qwen3)."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]


@app.callback()
def _root() -> None:
    """Exact KV-cache reuse analysis for multi-agent LLM pipelines (vLLM-identical hashes)."""


def _fail(message: str) -> None:
    # one line, whatever the terminal width: scripts grep it, people copy it
    Console(stderr=True, soft_wrap=True).print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(2)


def _read_json_arg(value: str, what: str) -> Any:
    """A JSON literal, a path to a JSON file, or ``-`` for standard input."""
    if value == "-":
        raw = sys.stdin.read()
    elif value.lstrip().startswith(("[", "{")):
        raw = value
    else:
        p = Path(value)
        if not p.is_file():
            _fail(f"{what}: {value!r} is neither JSON nor a readable file")
        raw = p.read_text("utf-8")
    try:
        return json.loads(raw)
    except json.JSONDecodeError as exc:
        _fail(f"{what}: invalid JSON ({exc})")


@app.command("hash")
def hash_cmd(
    text: Annotated[
        str | None, typer.Option("--text", help="Prompt text (as /v1/completions).")
    ] = None,
    token_ids: Annotated[
        str | None,
        typer.Option("--token-ids", help="Token ids: a JSON list, or a file holding one."),
    ] = None,
    messages: Annotated[
        str | None,
        typer.Option(
            "--messages",
            help="Chat messages file (JSON list, or an object with 'messages' and 'tools'); "
            "rendered with the model's chat template as /v1/chat/completions does.",
        ),
    ] = None,
    algo: AlgoOpt = "sha256",
    block_size: BlockSizeOpt = 16,
    hash_seed: HashSeedOpt = None,
    cache_salt: Annotated[
        str | None, typer.Option("--cache-salt", help="The request's cache_salt.")
    ] = None,
    lora_name: Annotated[
        str | None, typer.Option("--lora-name", help="LoRA adapter name (with --lora-path).")
    ] = None,
    lora_path: Annotated[
        str | None, typer.Option("--lora-path", help="LoRA adapter path as loaded by the engine.")
    ] = None,
    tokenizer: TokenizerOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Print the vLLM prefix-cache hash of every full block of a prompt."""
    given = [x is not None for x in (text, token_ids, messages)]
    if sum(given) != 1:
        _fail("give exactly one of --text, --token-ids, --messages")
    if (lora_name is None) != (lora_path is None):
        _fail("--lora-name and --lora-path go together")
    try:
        hasher = BlockHasher(algo, block_size=block_size, hash_seed=hash_seed)
        salt = validate_cache_salt(cache_salt)
        lora = LoRA(lora_name, lora_path) if lora_name and lora_path else None
        tk = PromptTokenizer.resolve(tokenizer)
        tp: TokenizedPrompt
        if text is not None:
            tp = tk.encode_text(text)
        elif token_ids is not None:
            ids = _read_json_arg(token_ids, "--token-ids")
            if not isinstance(ids, list) or not all(
                isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids
            ):
                _fail("--token-ids must be a JSON list of non-negative integers")
            # A debugging tool hashes what vLLM's hasher hashes: any non-negative id (the hash
            # takes the ids as they are; vLLM's request path is where the vocabulary is checked)
            over = [i for i in ids if i >= tk.vocab_size]
            if over:
                Console(stderr=True).print(
                    f"warning: {len(over)} token id(s) outside {tk.name}'s vocabulary "
                    f"[0, {tk.vocab_size}), e.g. {over[0]}: hashed as given"
                )
            tp = TokenizedPrompt(tuple(ids), "tokens")
        else:
            assert messages is not None
            body = _read_json_arg(messages, "--messages")
            tools = None
            if isinstance(body, dict):
                tools = body.get("tools")
                body = body.get("messages")
            if not isinstance(body, list):
                _fail("--messages must hold a list of messages or {'messages': [...]}")
            tp = tk.encode_chat(body, tools=tools)
        chain = hasher.chain(tp.token_ids, cache_salt=salt, lora=lora)
    except KvforgeError as exc:
        _fail(str(exc))
        return
    bs = hasher.block_size
    rows: list[dict[str, Any]] = []
    for i, h in enumerate(chain):
        span = tp.char_span(i * bs, (i + 1) * bs)
        block_text = (
            tp.text[span[0] : span[1]]
            if span is not None and tp.text is not None
            else tk.decode(tp.token_ids[i * bs : (i + 1) * bs])
        )
        rows.append(
            {
                "index": i,
                "start": i * bs,
                "hash_hex": h.hex(),
                "event_hash": event_hash(h),
                "text": block_text,
            }
        )
    if as_json:
        sys.stdout.write(json.dumps({"num_tokens": len(tp), "blocks": rows}, ensure_ascii=False))
        sys.stdout.write("\n")
        return
    console = Console()
    table = Table(
        title=f"{len(tp)} tokens → {len(rows)} full blocks of {bs} "
        f"({algo}, seed {'unset' if hash_seed is None else repr(hash_seed)}"
        f"{', salt ' + repr(salt) if salt else ''}{', LoRA ' + lora.name if lora else ''})",
        title_justify="left",
    )
    table.add_column("#", justify="right")
    table.add_column("start", justify="right")
    table.add_column("hash")
    table.add_column("event u64", justify="right")
    table.add_column("text", overflow="fold")
    for r in rows:
        table.add_row(
            str(r["index"]),
            str(r["start"]),
            r["hash_hex"][:16] + "…",
            str(r["event_hash"]),
            repr(r["text"]),
        )
    console.print(table)
    tail = len(tp) - len(rows) * bs
    if tail:
        console.print(f"[dim]{tail} trailing tokens form a partial block: vLLM never hashes it.[/]")


@app.command("analyze")
def analyze_cmd(
    trace: Annotated[Path, typer.Argument(help="JSONL trace, or a folder of prompt files.")],
    algo: AlgoOpt = "sha256",
    block_size: BlockSizeOpt = 16,
    hash_seed: HashSeedOpt = None,
    tokenizer: TokenizerOpt = None,
    as_json: JsonOpt = False,
    html: Annotated[
        Path | None, typer.Option("--html", help="Also write a self-contained HTML report.")
    ] = None,
    ms_per_block: Annotated[
        float,
        typer.Option(
            "--ms-per-block",
            min=0.0,
            help="Prefill ms a reused 16-token block saves (0.5: 8B model on an H200).",
        ),
    ] = 0.5,
    max_blocks: Annotated[
        int,
        typer.Option(
            "--max-blocks",
            min=1,
            help="Bound on distinct blocks kept for the replay (oldest requests dropped first).",
        ),
    ] = 2_000_000,
    min_gain: Annotated[
        int,
        typer.Option(
            "--min-gain",
            min=0,
            help="Layout changes gaining fewer tokens over the trace are folded into a count.",
        ),
    ] = 64,
) -> None:
    """Replay a multi-agent trace: what vLLM's prefix cache reuses per agent and agent pair,
    what it leaves on the table (moved content) and where each prefix breaks."""
    from kvforge.analyze import analyze, iter_trace
    from kvforge.match import SyncMatcher

    try:
        reqs = iter_trace(trace)
        matcher = SyncMatcher(
            block_size=block_size, hash_algo=algo, hash_seed=hash_seed, tokenizer=tokenizer
        )
        opts: dict[str, Any] = {
            "ms_per_block": ms_per_block,
            "max_blocks": max_blocks,
            "min_gain_tokens": min_gain,
        }
        if as_json:
            result = analyze(reqs, matcher, **opts)
        else:
            from rich.progress import track

            result = analyze(track(reqs, description="replaying", transient=True), matcher, **opts)
    except KvforgeError as exc:
        _fail(str(exc))
        return
    if html is not None:
        from kvforge.analyze.html import render_html

        page = render_html(result, title=f"kvforge analysis of {trace.name}")
        try:
            html.parent.mkdir(parents=True, exist_ok=True)
            html.write_text(page, "utf-8")
        except OSError as exc:
            _fail(f"cannot write the HTML report to {html}: {exc.strerror or exc}")
            return
    if as_json:
        sys.stdout.write(json.dumps(result.to_json(), ensure_ascii=False) + "\n")
        return
    console = Console()
    t = Table(title="Per agent (tokens)", title_justify="left")
    for col in (
        "agent",
        "requests",
        "prompt",
        "exact (prefix)",
        "moved",
        "near",
        "exact %",
        "prefill saved",
    ):
        t.add_column(col, justify="left" if col == "agent" else "right")
    for name, a in sorted(result.agents.items()):
        pct = 100 * a.exact_tokens / a.prompt_tokens if a.prompt_tokens else 0.0
        t.add_row(
            name,
            str(a.requests),
            f"{a.prompt_tokens:,}",
            f"{a.exact_tokens:,}",
            f"{a.moved_tokens:,}",
            f"{a.near_tokens:,}",
            f"{pct:.0f}%",
            f"{result.saved_ms(a.exact_tokens):,.1f} ms",
        )
    console.print(t)
    pairs = result.to_json()["pairs"]
    if pairs:
        pt = Table(
            title="Who reuses whom (tokens of agent's requests held by source)",
            title_justify="left",
        )
        for col in ("agent", "source", "exact", "moved"):
            pt.add_column(col, justify="left" if col in ("agent", "source") else "right")
        for p in pairs:
            pt.add_row(p["agent"], p["source"], f"{p['exact_tokens']:,}", f"{p['moved_tokens']:,}")
        console.print(pt)
    for note in result.notes():
        console.print(f"[bold]note:[/] {note}", highlight=False)
    console.print(f"[bold]advice:[/] {result.summary()}", highlight=False)
    for k, line in enumerate(result.advice, 1):
        console.print(f"  {k}. {line}", highlight=False)
    if result.divergences:
        dt = Table(title="Where prefixes break", title_justify="left")
        for col in ("line", "agent", "vs", "token", "why"):
            dt.add_column(col, overflow="fold")
        for d in result.divergences:
            dt.add_row(str(d.line), d.agent_id, d.source, str(d.token_index), d.reason)
        console.print(dt)


@app.command("export-trace")
def export_trace_cmd(
    trace: Annotated[Path, typer.Argument(help="JSONL trace, or a folder of prompt files.")],
    fmt: Annotated[str, typer.Option("--format", help="Output format: mooncake.")] = "mooncake",
    block_size: Annotated[
        int, typer.Option("--block-size", min=1, help="Tokens per hash id (Mooncake: 512).")
    ] = 512,
    output_length: Annotated[
        int,
        typer.Option(
            "--output-length",
            min=0,
            help="Output tokens of requests that do not say (output_length/max_tokens).",
        ),
    ] = 1,
    out: Annotated[
        Path | None, typer.Option("--output", "-o", help="File to write (default: stdout).")
    ] = None,
    tokenizer: TokenizerOpt = None,
) -> None:
    """Write a trace in another tool's format: Mooncake (timestamp, input/output length and
    per-block hash ids whose equality is vLLM's prefix sharing), read by Dynamo's data
    generator and aiperf's trace replay."""
    from kvforge.analyze import iter_trace
    from kvforge.analyze.export import mooncake_lines, write_mooncake
    from kvforge.tokenize import PromptTokenizer

    if fmt != "mooncake":
        _fail(f"unknown format {fmt!r}; supported: mooncake")
    try:
        lines = mooncake_lines(
            iter_trace(trace),
            PromptTokenizer.resolve(tokenizer),
            block_size=block_size,
            output_length=output_length,
        )
        if out is None:
            write_mooncake(lines, sys.stdout)
        else:
            out.parent.mkdir(parents=True, exist_ok=True)
            with out.open("w", encoding="utf-8") as fh:
                n = write_mooncake(lines, fh)
            Console(stderr=True).print(f"wrote {n} requests to {out}")
    except KvforgeError as exc:
        _fail(str(exc))
    except OSError as exc:
        _fail(f"cannot write {out}: {exc.strerror or exc}")


@app.command("doctor")
def doctor_cmd(
    url: Annotated[str, typer.Argument(help="The engine's base URL (vLLM-compatible server).")],
    model: Annotated[
        str | None, typer.Option("--model", help="Model name (default: the first served).")
    ] = None,
    events: Annotated[
        str | None,
        typer.Option(
            "--events",
            help="The engine's KV-event endpoint (tcp://host:port): also compare block hashes.",
        ),
    ] = None,
    topic: Annotated[str, typer.Option("--topic", help="The engine's KV-event topic.")] = "",
    trace: Annotated[
        Path | None, typer.Option("--trace", help="Also check your own requests (a trace).")
    ] = None,
    trace_limit: Annotated[
        int, typer.Option("--trace-limit", min=1, help="Requests of the trace to check.")
    ] = 20,
    algo: AlgoOpt = "sha256",
    block_size: BlockSizeOpt = 16,
    hash_seed: HashSeedOpt = None,
    tokenizer: TokenizerOpt = None,
    api_key_env: Annotated[
        str | None,
        typer.Option("--api-key-env", help="Variable holding the engine's API key, if any."),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Check that kvforge tokenizes and hashes as a running engine does: token ids from its
    /tokenize for text, chat, tools, render options (and your trace), block hashes from its KV
    events. Exit 0 when all agree, 1 on any mismatch (each explained), 2 when the engine cannot
    be asked."""
    import os

    from kvforge.analyze import iter_trace
    from kvforge.doctor import Doctor, default_samples, trace_samples
    from kvforge.tokenize import PromptTokenizer

    try:
        tk = PromptTokenizer.resolve(tokenizer)
        samples = default_samples()
        if trace is not None:
            samples += trace_samples(iter_trace(trace), trace_limit)
        key = os.environ.get(api_key_env) if api_key_env else None
        doc = Doctor(
            url, tk, algo=algo, block_size=block_size, hash_seed=hash_seed, model=model, api_key=key
        )
        try:
            report = doc.run(samples, events=events, topic=topic)
        finally:
            doc.close()
    except KvforgeError as exc:
        _fail(str(exc))
        return
    if as_json:
        sys.stdout.write(json.dumps(report.to_json(), ensure_ascii=False) + "\n")
    else:
        console = Console()
        console.print(f"engine {report.engine}, model {report.model}", highlight=False)
        for c in report.checks:
            mark = "[green]ok[/]  " if c.ok else "[bold red]FAIL[/]"
            console.print(f"{mark} {c.name}: {c.detail}", highlight=False)
        console.print("all checks agree" if report.ok else "kvforge and the engine disagree")
    if not report.ok:
        raise typer.Exit(1)


@app.command("simulate")
def simulate_cmd(
    trace: Annotated[
        Path, typer.Argument(help="JSONL trace of {agent_id, prompt|messages|token_ids, t?}.")
    ],
    engines: Annotated[
        int, typer.Option("--engines", min=1, help="Simulated engine replicas.")
    ] = 4,
    blocks_per_engine: Annotated[
        int, typer.Option("--blocks-per-engine", min=1, help="KV blocks per engine.")
    ] = 8192,
    policy: Annotated[
        str,
        typer.Option(
            "--policy",
            help="round_robin, least_load, first_block_hash, prefix, ttft, oracle, "
            "ttft_oracle or all",
        ),
    ] = "all",
    rate: Annotated[
        float, typer.Option("--rate", min=1e-9, help="Arrival-rate multiplier (t / rate).")
    ] = 1.0,
    prefill_ms_per_block: Annotated[
        float,
        typer.Option(
            "--prefill-ms-per-block",
            min=0.0,
            help="Prefill time of an uncached block (0.5 ms for 16 tokens: 8B on an H200).",
        ),
    ] = 0.5,
    block_size: BlockSizeOpt = 16,
    algo: AlgoOpt = "sha256",
    hash_seed: HashSeedOpt = None,
    tokenizer: TokenizerOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Replay a trace on simulated vLLM-like engines under routing policies and compare the
    prefix-cache hit rate, prefill tokens, load spread and time to first token."""
    from kvforge.analyze import read_trace
    from kvforge.sim import POLICIES, ClusterConfig, SimRequest, simulate

    names = list(POLICIES) if policy == "all" else [policy]
    if any(p not in POLICIES for p in names):
        _fail(f"unknown policy {policy!r}; expected one of {', '.join(POLICIES)} or all")
    try:
        tk = PromptTokenizer.resolve(tokenizer)
        reqs = []
        for r in read_trace(trace):
            tp = tk.tokenize(r.prompt, tools=r.tools, chat=r.chat)
            reqs.append(SimRequest(r.agent_id, tp.token_ids, r.cache_salt, r.t, r.output_length))
        cfg = ClusterConfig(
            engines=engines,
            blocks_per_engine=blocks_per_engine,
            block_size=block_size,
            hash_algo=algo,
            hash_seed=hash_seed,
            rate=rate,
            prefill_s_per_token=prefill_ms_per_block / 1000 / block_size,
        )
        results = {p: simulate(reqs, p, cfg) for p in names}
    except KvforgeError as exc:
        _fail(str(exc))
        return
    if as_json:
        doc = {"policies": {p: r.to_json() for p, r in results.items()}}
        sys.stdout.write(json.dumps(doc) + "\n")
        return
    table = Table(
        title=f"{len(reqs)} requests on {engines} engines × {blocks_per_engine} blocks",
        title_justify="left",
    )
    for col in (
        "policy",
        "hit rate",
        "prefill tokens",
        "prompt tokens",
        "load CV",
        "TTFT p50 (ms)",
        "TTFT p99 (ms)",
    ):
        table.add_column(col, justify="left" if col == "policy" else "right")
    for p, res in results.items():
        j = res.to_json()
        table.add_row(
            p,
            f"{res.hit_rate:.1%}",
            f"{res.prefill_tokens:,}",
            f"{res.prompt_tokens:,}",
            f"{res.load_cv:.2f}",
            f"{j['ttft_p50_s'] * 1e3:,.1f}",
            f"{j['ttft_p99_s'] * 1e3:,.1f}",
        )
    Console().print(table)


@app.command("serve")
def serve_cmd(
    config: Annotated[
        Path | None, typer.Option("--config", help="TOML file (see kvforge.config).")
    ] = None,
    host: Annotated[str | None, typer.Option("--host", help="Address to listen on.")] = None,
    port: Annotated[
        int | None, typer.Option("--port", min=1, max=65535, help="Port to listen on.")
    ] = None,
    block_size: Annotated[
        int | None, typer.Option("--block-size", min=1, help="The engines' --block-size.")
    ] = None,
    algo: Annotated[
        str | None, typer.Option("--algo", help="The engines' --prefix-caching-hash-algo.")
    ] = None,
    hash_seed: HashSeedOpt = None,
    tokenizer: TokenizerOpt = None,
    index_url: Annotated[
        str | None,
        typer.Option(
            "--index-url",
            help="memory:// (default) or redis://host:port/db?prefix=kvf&ttl=SECONDS: "
            "state shared by every replica on that Redis.",
        ),
    ] = None,
    api_token_env: Annotated[
        str | None,
        typer.Option(
            "--api-token-env",
            help="Name of the environment variable holding the "
            "bearer token (tokens never go on the command line).",
        ),
    ] = None,
    workers: Annotated[
        int | None,
        typer.Option(
            "--workers", min=1, help="Worker processes (> 1 needs a redis:// --index-url)."
        ),
    ] = None,
    record: Annotated[
        str | None,
        typer.Option("--record", help="Write every proxied request to this trace file."),
    ] = None,
    settings: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            help="SECTION.KEY=VALUE: any configuration field, e.g. router.policy=ttft "
            "(repeatable; the named flags win).",
        ),
    ] = None,
) -> None:
    """Run the HTTP service: index / match / clear / stats / prefix hash, routing and the
    OpenAI-compatible proxy for the engines of the config file, metrics, health.

    Settings come from flags, then KVFORGE_<SECTION>_<KEY> variables, then the file."""
    import os

    import uvicorn

    from kvforge.config import load_config, merge_overrides, parse_settings
    from kvforge.route.tenancy import TenantSalt
    from kvforge.serve.factory import SERVE_ARGS_ENV, api_token, build_app, serve_args

    named: dict[str, dict[str, Any]] = {
        "service": {
            "host": host,
            "port": port,
            "api_token_env": api_token_env,
            "index_url": index_url,
            "workers": workers,
            "record_path": record,
        },
        "matcher": {
            "block_size": block_size,
            "hash_algo": algo,
            "hash_seed": hash_seed,
            "tokenizer": tokenizer,
        },
    }
    note = Console(stderr=True).print
    try:
        overrides = merge_overrides(parse_settings(settings), named)
        cfg = load_config(config, overrides=overrides)
        sc = cfg.service
        if sc.workers == 1:
            app_ = build_app(cfg, announce=note)
        else:  # refuse a missing secret here, not in every worker
            api_token(cfg)
            if cfg.router.tenant_salt_env:
                TenantSalt.from_env(cfg.router.tenant_salt_env)
    except KvforgeError as exc:
        _fail(str(exc))
        return
    if sc.workers == 1:
        uvicorn.run(app_, host=sc.host, port=sc.port, log_level="info")
        return
    # each worker process builds the same service from the same configuration
    os.environ[SERVE_ARGS_ENV] = serve_args(str(config) if config else None, overrides)
    uvicorn.run(
        "kvforge.serve.factory:app_from_env",
        factory=True,
        workers=sc.workers,
        host=sc.host,
        port=sc.port,
        log_level="info",
    )


def main() -> None:
    app()


if __name__ == "__main__":
    main()
