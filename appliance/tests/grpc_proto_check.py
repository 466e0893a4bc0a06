"""Checks appliance/proto/grpc_service.proto against the descriptor tritonclient ships.

Every message, field (name, number, type, label) and call of the appliance's proto must be the
same in tritonclient's grpc_service.proto (the appliance's proto is a subset). Run with the
project's .venv: python grpc_proto_check.py <proto file>. Prints what differs; exit 1 if any.
"""

import re
import sys

from tritonclient.grpc import service_pb2 as pb


def parse(text):
    """message path -> {field: (number, type, repeated)}, and the calls."""
    text = re.sub(r"//[^\n]*", "", text)
    messages, calls, stack = {}, {}, []
    for token in re.finditer(r"(message|oneof)\s+(\w+)\s*\{|(\})|rpc\s+(\w+)\((stream\s+)?(\w+)\)\s*returns\s*\((stream\s+)?(\w+)\)|((repeated\s+)?(map<\s*\w+\s*,\s*\w+\s*>|[\w.]+)\s+(\w+)\s*=\s*(\d+)\s*;)", text):
        if token.group(1) == "message":
            stack.append(token.group(2))
            messages[".".join(stack)] = {}
        elif token.group(1) == "oneof":
            stack.append(None)
        elif token.group(3):
            if stack:
                stack.pop()
        elif token.group(4):
            calls[token.group(4)] = (bool(token.group(5)), token.group(6), bool(token.group(7)), token.group(8))
        elif token.group(9):
            path = ".".join(s for s in stack if s)
            messages[path][token.group(12)] = (int(token.group(13)), token.group(11), bool(token.group(10)))
    return messages, calls


SCALARS = {1: "double", 2: "float", 3: "int64", 4: "uint64", 5: "int32", 8: "bool", 9: "string", 12: "bytes", 13: "uint32"}


def main():
    messages, calls = parse(open(sys.argv[1]).read())
    problems = []
    pool = pb.DESCRIPTOR
    for path, fields in messages.items():
        try:
            desc = pool.message_types_by_name[path.split(".")[0]]
            for part in path.split(".")[1:]:
                desc = desc.nested_types_by_name[part]
        except KeyError:
            problems.append(f"message {path}: not in tritonclient's proto")
            continue
        for name, (number, type_, repeated) in fields.items():
            theirs = desc.fields_by_name.get(name)
            if theirs is None:
                problems.append(f"{path}.{name}: not in tritonclient's proto")
                continue
            if theirs.number != number:
                problems.append(f"{path}.{name}: number {number}, tritonclient's {theirs.number}")
            if type_.startswith("map<"):
                ok = theirs.message_type is not None and theirs.message_type.GetOptions().map_entry
            elif theirs.message_type is not None:
                ok = theirs.message_type.name == type_.split(".")[-1]
            else:
                ok = SCALARS.get(theirs.type) == type_
            if not ok:
                problems.append(f"{path}.{name}: type {type_} differs from tritonclient's")
            their_repeated = theirs.label == theirs.LABEL_REPEATED and not type_.startswith("map<")
            if not type_.startswith("map<") and their_repeated != repeated:
                problems.append(f"{path}.{name}: repeated differs")
    service = pool.services_by_name["GRPCInferenceService"]
    for name, (cs, req, ss, resp) in calls.items():
        m = service.methods_by_name.get(name)
        if m is None:
            problems.append(f"rpc {name}: not in tritonclient's service")
            continue
        if (m.input_type.name, m.output_type.name) != (req, resp):
            problems.append(f"rpc {name}: types differ")
    for p in problems:
        print(p)
    print(f"{len(messages)} messages, {sum(len(f) for f in messages.values())} fields, {len(calls)} calls checked; {len(problems)} problems")
    sys.exit(1 if problems else 0)


main()
