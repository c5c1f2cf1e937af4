"""Quick start: submit functions, wait on Futures, and use @remote.

Run: python examples/quickstart.py
"""

from __future__ import annotations

import sharedcompute as sc


def square(x: int) -> int:
    return x * x


@sc.remote
def add(a: int, b: int) -> int:
    return a + b


def main() -> None:
    with sc.Runtime(num_workers=2):
        future = sc.submit(square, 7)
        print("square(7) =", future.result(timeout=30))

        squares = sc.map(square, range(10))
        print("squares:", sc.gather(squares, timeout=30))

        # Futures passed as arguments are dependencies: add() runs once both are done,
        # and receives their values.
        total = add.submit(squares[3], squares[4])
        print("9 + 16 =", total.result(timeout=30))

        # Calling a remote function directly runs it here, as a plain function.
        print("add(1, 2) =", add(1, 2))

        # Errors come back with their own type and the worker's traceback as the cause.
        failing = sc.submit(int, "not a number")
        try:
            failing.result(timeout=30)
        except ValueError as exc:
            print("caught:", repr(exc))


if __name__ == "__main__":
    main()
