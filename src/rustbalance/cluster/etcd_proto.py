"""The part of etcd's v3 gRPC schema the etcd backend uses, declared once, encoded by protobuf.

etcd speaks gRPC with protobuf messages (``api/etcdserverpb/rpc.proto`` and
``api/mvccpb/kv.proto`` in etcd's source; the numbers below are those files' field numbers, the
same in etcd 3.4, 3.5 and 3.6). No maintained Python client fits (docs/etcd.md, "Why this
client"), so the backend calls the RPCs through ``grpcio`` itself and needs the message
classes. Rather than generated ``*_pb2.py`` files (which need etcd's ``.proto`` files with
their gogoproto and gateway imports, and ``protoc`` at build time), the few messages used are
declared here as a ``FileDescriptorProto`` and their classes built by the ``protobuf``
runtime: the encoder and the parser of untrusted bytes are protobuf's, not ours.

Only what the backend sends or reads is declared. Fields etcd sends that are not declared are
kept by protobuf as unknown fields and ignored, so a newer etcd never breaks decoding.

Enums are declared as ``int32`` fields (same varint wire encoding); the values used are the
module constants below. ``Compare.target_union`` is a real ``oneof``: a proto3 scalar outside
a oneof is not sent when it is 0, and ``create_revision == 0`` (the key does not exist) is the
comparison the election relies on.
"""

from __future__ import annotations

from typing import Any, Final

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

__all__ = [
    "COMPARE_CREATE",
    "COMPARE_EQUAL",
    "COMPARE_LESS",
    "EVENT_DELETE",
    "EVENT_PUT",
    "METHODS",
    "Messages",
    "messages",
]

# rpc.proto, Compare.CompareResult and Compare.CompareTarget.
COMPARE_EQUAL: Final = 0
COMPARE_GREATER: Final = 1
COMPARE_LESS: Final = 2
COMPARE_CREATE: Final = 1
# kv.proto, Event.EventType.
EVENT_PUT: Final = 0
EVENT_DELETE: Final = 1

_F = descriptor_pb2.FieldDescriptorProto
_INT64, _UINT64, _INT32, _BOOL = _F.TYPE_INT64, _F.TYPE_UINT64, _F.TYPE_INT32, _F.TYPE_BOOL
_STRING, _BYTES, _MESSAGE = _F.TYPE_STRING, _F.TYPE_BYTES, _F.TYPE_MESSAGE
_PACKAGE = "rustbalance.etcd"

# (message name, ((field name, number, type, repeated, message type or "", oneof index), ...),
#  oneof names). Field numbers: etcd api/etcdserverpb/rpc.proto and api/mvccpb/kv.proto.
_Field = tuple[str, int, int, bool, str, int | None]
_SCHEMA: tuple[tuple[str, tuple[_Field, ...], tuple[str, ...]], ...] = (
    (
        "ResponseHeader",
        (
            ("cluster_id", 1, _UINT64, False, "", None),
            ("member_id", 2, _UINT64, False, "", None),
            ("revision", 3, _INT64, False, "", None),
            ("raft_term", 4, _UINT64, False, "", None),
        ),
        (),
    ),
    (
        # mvccpb.KeyValue
        "KeyValue",
        (
            ("key", 1, _BYTES, False, "", None),
            ("create_revision", 2, _INT64, False, "", None),
            ("mod_revision", 3, _INT64, False, "", None),
            ("version", 4, _INT64, False, "", None),
            ("value", 5, _BYTES, False, "", None),
            ("lease", 6, _INT64, False, "", None),
        ),
        (),
    ),
    (
        # mvccpb.Event: type PUT = 0, DELETE = 1
        "Event",
        (
            ("type", 1, _INT32, False, "", None),
            ("kv", 2, _MESSAGE, False, "KeyValue", None),
            ("prev_kv", 3, _MESSAGE, False, "KeyValue", None),
        ),
        (),
    ),
    (
        "RangeRequest",
        (
            ("key", 1, _BYTES, False, "", None),
            ("range_end", 2, _BYTES, False, "", None),
            ("limit", 3, _INT64, False, "", None),
            ("revision", 4, _INT64, False, "", None),
            ("serializable", 7, _BOOL, False, "", None),
        ),
        (),
    ),
    (
        "RangeResponse",
        (
            ("header", 1, _MESSAGE, False, "ResponseHeader", None),
            ("kvs", 2, _MESSAGE, True, "KeyValue", None),
            ("more", 3, _BOOL, False, "", None),
            ("count", 4, _INT64, False, "", None),
        ),
        (),
    ),
    (
        "PutRequest",
        (
            ("key", 1, _BYTES, False, "", None),
            ("value", 2, _BYTES, False, "", None),
            ("lease", 3, _INT64, False, "", None),
        ),
        (),
    ),
    ("PutResponse", (("header", 1, _MESSAGE, False, "ResponseHeader", None),), ()),
    (
        "DeleteRangeRequest",
        (
            ("key", 1, _BYTES, False, "", None),
            ("range_end", 2, _BYTES, False, "", None),
        ),
        (),
    ),
    (
        "DeleteRangeResponse",
        (
            ("header", 1, _MESSAGE, False, "ResponseHeader", None),
            ("deleted", 2, _INT64, False, "", None),
        ),
        (),
    ),
    (
        # oneof request
        "RequestOp",
        (
            ("request_range", 1, _MESSAGE, False, "RangeRequest", None),
            ("request_put", 2, _MESSAGE, False, "PutRequest", None),
            ("request_delete_range", 3, _MESSAGE, False, "DeleteRangeRequest", None),
        ),
        (),
    ),
    (
        # oneof response
        "ResponseOp",
        (
            ("response_range", 1, _MESSAGE, False, "RangeResponse", None),
            ("response_put", 2, _MESSAGE, False, "PutResponse", None),
            ("response_delete_range", 3, _MESSAGE, False, "DeleteRangeResponse", None),
        ),
        (),
    ),
    (
        "Compare",
        (
            ("result", 1, _INT32, False, "", None),
            ("target", 2, _INT32, False, "", None),
            ("key", 3, _BYTES, False, "", None),
            ("version", 4, _INT64, False, "", 0),
            ("create_revision", 5, _INT64, False, "", 0),
            ("mod_revision", 6, _INT64, False, "", 0),
            ("value", 7, _BYTES, False, "", 0),
            ("lease", 8, _INT64, False, "", 0),
            ("range_end", 64, _BYTES, False, "", None),
        ),
        ("target_union",),
    ),
    (
        "TxnRequest",
        (
            ("compare", 1, _MESSAGE, True, "Compare", None),
            ("success", 2, _MESSAGE, True, "RequestOp", None),
            ("failure", 3, _MESSAGE, True, "RequestOp", None),
        ),
        (),
    ),
    (
        "TxnResponse",
        (
            ("header", 1, _MESSAGE, False, "ResponseHeader", None),
            ("succeeded", 2, _BOOL, False, "", None),
            ("responses", 3, _MESSAGE, True, "ResponseOp", None),
        ),
        (),
    ),
    (
        "LeaseGrantRequest",
        (("TTL", 1, _INT64, False, "", None), ("ID", 2, _INT64, False, "", None)),
        (),
    ),
    (
        "LeaseGrantResponse",
        (
            ("header", 1, _MESSAGE, False, "ResponseHeader", None),
            ("ID", 2, _INT64, False, "", None),
            ("TTL", 3, _INT64, False, "", None),
            ("error", 4, _STRING, False, "", None),
        ),
        (),
    ),
    ("LeaseRevokeRequest", (("ID", 1, _INT64, False, "", None),), ()),
    ("LeaseRevokeResponse", (("header", 1, _MESSAGE, False, "ResponseHeader", None),), ()),
    ("LeaseKeepAliveRequest", (("ID", 1, _INT64, False, "", None),), ()),
    (
        "LeaseKeepAliveResponse",
        (
            ("header", 1, _MESSAGE, False, "ResponseHeader", None),
            ("ID", 2, _INT64, False, "", None),
            ("TTL", 3, _INT64, False, "", None),
        ),
        (),
    ),
    (
        # oneof request_union
        "WatchRequest",
        (
            ("create_request", 1, _MESSAGE, False, "WatchCreateRequest", None),
            ("cancel_request", 2, _MESSAGE, False, "WatchCancelRequest", None),
        ),
        (),
    ),
    (
        "WatchCreateRequest",
        (
            ("key", 1, _BYTES, False, "", None),
            ("range_end", 2, _BYTES, False, "", None),
            ("start_revision", 3, _INT64, False, "", None),
            ("progress_notify", 4, _BOOL, False, "", None),
            ("prev_kv", 6, _BOOL, False, "", None),
        ),
        (),
    ),
    ("WatchCancelRequest", (("watch_id", 1, _INT64, False, "", None),), ()),
    (
        "WatchResponse",
        (
            ("header", 1, _MESSAGE, False, "ResponseHeader", None),
            ("watch_id", 2, _INT64, False, "", None),
            ("created", 3, _BOOL, False, "", None),
            ("canceled", 4, _BOOL, False, "", None),
            ("compact_revision", 5, _INT64, False, "", None),
            ("cancel_reason", 6, _STRING, False, "", None),
            ("fragment", 7, _BOOL, False, "", None),
            ("events", 11, _MESSAGE, True, "Event", None),
        ),
        (),
    ),
)

# gRPC method paths: "/<proto package>.<service>/<method>" of rpc.proto (package etcdserverpb).
METHODS: Final = {
    "Range": "/etcdserverpb.KV/Range",
    "Put": "/etcdserverpb.KV/Put",
    "DeleteRange": "/etcdserverpb.KV/DeleteRange",
    "Txn": "/etcdserverpb.KV/Txn",
    "LeaseGrant": "/etcdserverpb.Lease/LeaseGrant",
    "LeaseRevoke": "/etcdserverpb.Lease/LeaseRevoke",
    "LeaseKeepAlive": "/etcdserverpb.Lease/LeaseKeepAlive",
    "Watch": "/etcdserverpb.Watch/Watch",
}


def _file_descriptor() -> descriptor_pb2.FileDescriptorProto:
    proto = descriptor_pb2.FileDescriptorProto(
        name="rustbalance_etcd_subset.proto", package=_PACKAGE, syntax="proto3"
    )
    for name, fields, oneofs in _SCHEMA:
        message = proto.message_type.add(name=name)
        for oneof in oneofs:
            message.oneof_decl.add(name=oneof)
        for field_name, number, kind, repeated, type_name, oneof_index in fields:
            field = message.field.add(
                name=field_name,
                number=number,
                type=kind,
                label=_F.LABEL_REPEATED if repeated else _F.LABEL_OPTIONAL,
            )
            if type_name:
                field.type_name = f".{_PACKAGE}.{type_name}"
            if oneof_index is not None:
                field.oneof_index = oneof_index
    return proto


class Messages:
    """The message classes, as attributes named like the messages (``messages().PutRequest``).

    Typed ``Any``: they are built at run time, so mypy cannot know their fields; the client
    module (:mod:`rustbalance.cluster.etcd_client`) converts every response into typed
    dataclasses at once.
    """

    def __init__(self) -> None:
        pool = descriptor_pool.DescriptorPool()
        pool.Add(_file_descriptor())
        for name, _fields, _oneofs in _SCHEMA:
            descriptor = pool.FindMessageTypeByName(f"{_PACKAGE}.{name}")
            setattr(self, name, message_factory.GetMessageClass(descriptor))

    def __getattr__(self, name: str) -> Any:  # only reached for names not declared
        raise AttributeError(f"etcd message {name!r} is not declared in etcd_proto")


_MESSAGES: Messages | None = None


def messages() -> Messages:
    """The message classes (built once, on first use)."""
    global _MESSAGES
    if _MESSAGES is None:
        _MESSAGES = Messages()
    return _MESSAGES
