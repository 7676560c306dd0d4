"""Client commands of the ``loramux`` CLI: generate, adapters, info."""

from __future__ import annotations

import argparse
import sys

import grpc

from .bench import add_bench_command
from .client import LoraMuxClient
from .runs import row_runs
from .types import Sampling

DEFAULT_SERVER = "127.0.0.1:50051"


def add_client_commands(sub) -> None:
    def with_server(p):
        p.add_argument("--server", default=DEFAULT_SERVER, help=f"HOST:PORT of the server (default {DEFAULT_SERVER})")
        return p

    g = with_server(sub.add_parser("generate", help="stream a completion to the terminal"))
    g.add_argument("prompt")
    who = g.add_mutually_exclusive_group()
    who.add_argument("--adapter", default="", help="adapter id (default: the base model)")
    who.add_argument("--combine", nargs="+", metavar="ID=WEIGHT", type=weighted_id, default=None,
                     help="run with the weighted sum of registered adapters (their ranks side by side)")
    g.add_argument("--max-new-tokens", type=int, default=None)
    g.add_argument("--temperature", type=float, default=None)
    g.add_argument("--raw", action="store_true", help="send a plain prompt even when the model has a chat template")
    g.add_argument("--priority", type=int, default=0,
                   help="lower first, on a server run with --scheduling priority (others accept only 0)")
    shape = g.add_mutually_exclusive_group()
    shape.add_argument("--json-schema", default=None, help="the text must match this JSON schema (JSON text)")
    shape.add_argument("--json-object", action="store_true", help="the text must be a JSON object")
    shape.add_argument("--regex", default=None, help="the text must match this regex")
    shape.add_argument("--choice", nargs="+", default=None, help="the text must be one of these")
    shape.add_argument("--grammar", default=None, help="the text must follow this grammar (Lark, or GBNF)")
    g.set_defaults(func=cmd_generate)

    a = sub.add_parser("adapters", help="list, register or unregister adapters")
    asub = a.add_subparsers(dest="action", required=True)
    with_server(asub.add_parser("list", help="list registered adapters")).set_defaults(func=cmd_adapters_list)
    r = with_server(asub.add_parser("register", help="register a PEFT adapter directory"))
    r.add_argument("adapter_id")
    r.add_argument("path", nargs="?", default="", help="the PEFT directory (not with --combine)")
    r.add_argument("--combine", nargs="+", metavar="ID=WEIGHT", type=weighted_id, default=None,
                   help="register the weighted sum of registered adapters instead (their ranks side by side)")
    r.add_argument("--replace", action="store_true", help="swap an existing id to new weights")
    r.add_argument("--preload", action="store_true", help="load into host memory now")
    r.add_argument("--weight", type=float, default=None, help="fair-scheduling share (default 1)")
    r.add_argument("--keep-resident", action="store_true", help="keep in device memory, never evicted")
    r.set_defaults(func=cmd_adapters_register)
    u = with_server(asub.add_parser("unregister", help="remove an adapter"))
    u.add_argument("adapter_id")
    u.set_defaults(func=cmd_adapters_unregister)

    with_server(sub.add_parser("info", help="show the server's model and limits")).set_defaults(func=cmd_info)
    add_bench_command(sub, with_server)


def weighted_id(text: str) -> tuple[str, float]:
    """ID=WEIGHT -> (id, weight)."""
    adapter_id, sep, weight = text.rpartition("=")
    try:
        if not sep or not adapter_id:
            raise ValueError
        return adapter_id, float(weight)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected ID=WEIGHT, got {text!r}") from None


def cmd_generate(args) -> int:
    with LoraMuxClient(args.server) as client:
        sampling = Sampling(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                            json_schema=args.json_schema, json_object=args.json_object, regex=args.regex,
                            choice=args.choice, grammar=args.grammar)
        use_chat = not args.raw and client.server_info().has_chat_template
        prompt_kwargs = {"messages": [("user", args.prompt)]} if use_chat else {"prompt": args.prompt}
        for chunk in client.generate_stream(adapter_id=args.adapter, sampling=sampling, priority=args.priority,
                                             combine=args.combine, **prompt_kwargs):
            sys.stdout.write(chunk.text)
            sys.stdout.flush()
        sys.stdout.write("\n")
    return 0


def cmd_adapters_list(args) -> int:
    with LoraMuxClient(args.server) as client:
        adapters = client.list_adapters()
    if not adapters:
        print("no adapters registered")
    for a in adapters:
        kept = "\tkept" if a.keep_resident else ""
        where = " + ".join(f"{w:g} x {part}" for part, w in a.combine) if a.combine else a.path
        dora = " dora" if a.use_dora else ""
        tokens = f" tokens={len(a.trainable_token_ids)}" if a.trainable_token_ids else ""
        tokens += f" saved={','.join(a.modules_to_save)}" if a.modules_to_save else ""
        tokens += f" vocab={a.vocab_size}" if a.vocab_size else ""
        tokens += " own-tokenizer" if a.own_tokenizer else ""
        print(f"{a.adapter_id}\trank={a.rank}{dora}{tokens}\ttier={a.tier}\tserved={a.requests_served}{kept}\t{where}")
    return 0


def cmd_adapters_register(args) -> int:
    with LoraMuxClient(args.server) as client:
        a = client.register_adapter(args.adapter_id, args.path, replace=args.replace, preload=args.preload,
                                    weight=args.weight, keep_resident=args.keep_resident, combine=args.combine)
    print(f"registered {a.adapter_id} (rank {a.rank}, targets {','.join(a.target_modules)})")
    return 0


def cmd_adapters_unregister(args) -> int:
    with LoraMuxClient(args.server) as client:
        client.unregister_adapter(args.adapter_id)
    print(f"unregistered {args.adapter_id}")
    return 0


def cmd_info(args) -> int:
    with LoraMuxClient(args.server) as client:
        info = client.server_info()
    for k, v in info.__dict__.items():
        print(f"{k}: {(row_runs(v) or 'none') if k == 'base_kernel_rows' else v}")
    return 0


def run_client_command(args: argparse.Namespace) -> int:
    try:
        return args.func(args)
    except grpc.RpcError as e:
        print(f"error: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
