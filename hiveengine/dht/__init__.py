"""Kademlia DHT over the hiveengine transport: store/get with expiration, subkeys, owner-signed records."""

from hiveengine.dht.dht import DHT
from hiveengine.dht.node import DHTConfig, DHTNode
from hiveengine.dht.protocol import MAX_KEY_BYTES, MAX_VALUE_BYTES
from hiveengine.dht.storage import Record, ValueWithExpiration, get_dht_time
from hiveengine.dht.validation import OwnerSignatureValidator, RecordValidator, owner_marker

__all__ = [
    "DHT",
    "MAX_KEY_BYTES",
    "MAX_VALUE_BYTES",
    "DHTConfig",
    "DHTNode",
    "OwnerSignatureValidator",
    "Record",
    "RecordValidator",
    "ValueWithExpiration",
    "get_dht_time",
    "owner_marker",
]
