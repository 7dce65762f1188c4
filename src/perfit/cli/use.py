"""`perfit export`, `perfit chat` and `perfit join`: what an owner does with a finished run."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from perfit.cli.base import app, console, errors

RUN_DIR = typer.Argument(..., help="A finished run directory, e.g. runs/demo/perfit.")
BASE_MODEL = typer.Option(None, "--model", help="Where the run's base model is, if not where the run recorded it.")


@app.command()
def export(
    run_dir: Path = RUN_DIR,
    client: str = typer.Option(..., "--client", help="Client id, or the owner's name (`--split owner`)."),
    out: Path = typer.Option(..., "--out", help="Output directory."),
    merge: bool = typer.Option(False, "--merge", help="Merge the adapter into the base model."),
    force: bool = typer.Option(False, "--force", help="Overwrite a non-empty output directory."),
    model: str | None = BASE_MODEL,
) -> None:
    """Export a client's personalized adapter (PEFT) or the base model with it merged in."""
    from perfit.use.export import export_client

    command = f"perfit export {run_dir} --client {client} --out {out}" + (" --merge" if merge else "")
    with errors("export"):
        written = export_client(run_dir, client, out, merge=merge, force=force, command=command, model=model)
    console.print(f"{'merged model' if merge else 'adapter'} of client {client} -> {written}")


@app.command()
def chat(
    run_dir: Path = RUN_DIR,
    client: str = typer.Option(..., "--client", help="Client id, or the owner's name, whose model answers."),
    prompt: str | None = typer.Option(None, "--prompt", help="Answer this one instruction and exit."),
    context: str = typer.Option("", "--context", help="Input/context given with every instruction."),
    compare: bool = typer.Option(False, "--compare", help="Answer with base, global and personalized models."),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", min=1),
    temperature: float = typer.Option(0.0, "--temperature", min=0.0, help="0 is greedy."),
    model: str | None = BASE_MODEL,
) -> None:
    """Chat with a client's personalized model (Alpaca prompt); Ctrl-C or Ctrl-D ends it."""
    from perfit.client.generation import generate
    from perfit.use.export import RunModel

    with errors("chat"):
        loaded = RunModel(run_dir, model)
        personal = loaded.flat(client)
        shared = loaded.flat(None) if compare else None
    settings = {"context": context, "max_new_tokens": max_new_tokens, "temperature": temperature}

    def answer(instruction: str) -> None:
        if not compare:
            generate(loaded.use(personal), loaded.tokenizer, instruction, on_text=_print_stream, **settings)
            console.print()
            return
        table = Table(title=instruction, show_lines=True)
        answers = []
        with loaded.peft_model.disable_adapter():
            answers.append(generate(loaded.peft_model, loaded.tokenizer, instruction, **settings))
        for flat in (shared, personal):
            answers.append(generate(loaded.use(flat), loaded.tokenizer, instruction, **settings))
        for column in ("base model", "global adapter", f"client {client} (personalized)"):
            table.add_column(column, overflow="fold")
        table.add_row(*answers)
        console.print(table)

    if prompt is not None:
        answer(prompt)
        return
    console.print(f"client {client} of {loaded.run.path} ({loaded.run.config.method}); Ctrl-D or Ctrl-C to leave")
    try:
        while True:
            instruction = console.input("[bold]you>[/bold] ").strip()
            if instruction:
                answer(instruction)
    except (EOFError, KeyboardInterrupt):
        console.print()


def _print_stream(text: str) -> None:
    console.print(text, end="", markup=False, highlight=False, soft_wrap=True)


@app.command()
def join(
    run_dir: Path = RUN_DIR,
    out: Path = typer.Option(..., "--out", help="Output directory for the owner's adapter and join.json."),
    data: Path | None = typer.Option(None, "--data", help="The new owner's .jsonl (instruction data)."),
    holdout_client: int | None = typer.Option(
        None, "--holdout-client", help="Instead of --data: a client the run held out (to measure join)."
    ),
    force: bool = typer.Option(False, "--force", help="Overwrite a non-empty output directory."),
    model: str | None = BASE_MODEL,
) -> None:
    """Personalize a finished run for a data owner who did not take part in training."""
    from perfit.use.join import join as join_run

    source = f"--data {data}" if data is not None else f"--holdout-client {holdout_client}"
    with errors("join"):
        report = join_run(
            run_dir,
            out,
            data=data,
            holdout_client=holdout_client,
            model=model,
            force=force,
            command=f"perfit join {run_dir} {source} --out {out}",
        )
    table = Table(title=f"Personalized perplexity of the new owner ({report['eval_rows']} held-out rows)")
    for column in ("base model", "global adapter", "own adapter", "trainable", "wall"):
        table.add_column(column, justify="right")
    table.add_row(
        f"{report['ppl_base']:.3f}",
        f"{report['ppl_global']:.3f}",
        f"{report['ppl_own']:.3f}",
        f"{report['trainable_params']:,}",
        f"{report['seconds']:.0f} s",
    )
    console.print(table)
    console.print(f"adapter and join.json -> {out}")
