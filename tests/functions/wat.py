"""Test functions, written in the WebAssembly text format and compiled with wasmtime's wat2wasm."""

from __future__ import annotations

import wasmtime

_IMPORTS = """
  (import "teecloud" "input_len" (func $input_len (result i32)))
  (import "teecloud" "input_read" (func $input_read (param i32)))
  (import "teecloud" "output" (func $output (param i32 i32) (result i32)))
  (import "teecloud" "http_get" (func $http_get (param i32 i32 i32 i32) (result i32)))
  (import "teecloud" "secret_get" (func $secret_get (param i32 i32 i32 i32) (result i32)))
  (import "teecloud" "log" (func $log (param i32 i32)))
"""


def module(body: str, *, pages: int = 2) -> bytes:
    return bytes(wasmtime.wat2wasm(f'(module {_IMPORTS} (memory (export "memory") {pages}) {body})'))


# output = input
ECHO = module("""
  (func (export "run") (result i32)
    (call $input_read (i32.const 0))
    (drop (call $output (i32.const 0) (call $input_len)))
    (i32.const 0))
""")

# input = a URL; fetch it; the body is a decimal number; output = that number as an ABI uint256 (32 bytes)
PRICE = module("""
  (data (i32.const 4096) "fetched")
  (func (export "run") (result i32)
    (local $n i32) (local $i i32) (local $acc i64) (local $c i32) (local $k i32)
    (call $input_read (i32.const 0))
    (local.set $n (call $http_get (i32.const 0) (call $input_len) (i32.const 8192) (i32.const 64)))
    (if (i32.lt_s (local.get $n) (i32.const 0)) (then (return (i32.sub (i32.const 100) (local.get $n)))))
    (call $log (i32.const 4096) (i32.const 7))
    (block $done (loop $digits
      (br_if $done (i32.ge_u (local.get $i) (local.get $n)))
      (local.set $c (i32.load8_u (i32.add (i32.const 8192) (local.get $i))))
      (if (i32.or (i32.lt_u (local.get $c) (i32.const 48)) (i32.gt_u (local.get $c) (i32.const 57)))
        (then (return (i32.const 2))))
      (local.set $acc (i64.add (i64.mul (local.get $acc) (i64.const 10))
                               (i64.extend_i32_u (i32.sub (local.get $c) (i32.const 48)))))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br $digits)))
    (memory.fill (i32.const 16384) (i32.const 0) (i32.const 32))
    (local.set $k (i32.const 0))
    (loop $bytes
      (i32.store8 (i32.sub (i32.const 16415) (local.get $k)) (i32.wrap_i64 (local.get $acc)))
      (local.set $acc (i64.shr_u (local.get $acc) (i64.const 8)))
      (local.set $k (i32.add (local.get $k) (i32.const 1)))
      (br_if $bytes (i32.lt_u (local.get $k) (i32.const 8))))
    (drop (call $output (i32.const 16384) (i32.const 32)))
    (i32.const 0))
""")

# input = a secret's name; output = its value, or "none"
SECRET = module("""
  (data (i32.const 4096) "none")
  (func (export "run") (result i32)
    (local $n i32)
    (call $input_read (i32.const 0))
    (local.set $n (call $secret_get (i32.const 0) (call $input_len) (i32.const 8192) (i32.const 1024)))
    (if (i32.lt_s (local.get $n) (i32.const 0))
      (then (drop (call $output (i32.const 4096) (i32.const 4))))
      (else (drop (call $output (i32.const 8192) (local.get $n)))))
    (i32.const 0))
""")

# input = a URL; fetch it up to 10 times; output = the codes of each attempt (one signed byte each)
FETCH_MANY = module("""
  (func (export "run") (result i32)
    (local $i i32)
    (call $input_read (i32.const 0))
    (loop $again
      (i32.store8 (i32.add (i32.const 4096) (local.get $i))
        (call $http_get (i32.const 0) (call $input_len) (i32.const 8192) (i32.const 1024)))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br_if $again (i32.lt_u (local.get $i) (i32.const 10))))
    (drop (call $output (i32.const 4096) (i32.const 10)))
    (i32.const 0))
""")

# input = a URL; output = the fetch's return code as one signed byte (or the body when it worked)
FETCH_ONCE = module(
    """
  (func (export "run") (result i32)
    (local $n i32)
    (call $input_read (i32.const 0))
    (local.set $n (call $http_get (i32.const 0) (call $input_len) (i32.const 8192) (i32.const 65536)))
    (if (i32.lt_s (local.get $n) (i32.const 0))
      (then (i32.store8 (i32.const 4096) (local.get $n)) (drop (call $output (i32.const 4096) (i32.const 1))))
      (else (drop (call $output (i32.const 8192) (local.get $n)))))
    (i32.const 0))
""",
    pages=3,
)

INFINITE_LOOP = bytes(
    wasmtime.wat2wasm(
        '(module (memory (export "memory") 1)'
        ' (func (export "run") (result i32) (loop $l (br $l)) (i32.const 0)))'
    )
)

# grows memory 1 MiB at a time until refused, then traps (what an allocator's abort does)
MEMORY_BOMB = module("""
  (func (export "run") (result i32)
    (loop $l
      (if (i32.eq (memory.grow (i32.const 16)) (i32.const -1)) (then unreachable))
      (br $l))
    (i32.const 0))
""")

# writes an output of (input as 4 little-endian bytes) length
BIG_OUTPUT = module(
    """
  (func (export "run") (result i32)
    (call $input_read (i32.const 0))
    (drop (call $output (i32.const 0) (i32.load (i32.const 0))))
    (i32.const 0))
""",
    pages=2,
)

# counts a global up on each call: a second call must see 1 again (no state across calls)
COUNTER = module("""
  (global $count (mut i32) (i32.const 0))
  (func (export "run") (result i32)
    (global.set $count (i32.add (global.get $count) (i32.const 1)))
    (i32.store8 (i32.const 0) (global.get $count))
    (drop (call $output (i32.const 0) (i32.const 1)))
    (i32.const 0))
""")
