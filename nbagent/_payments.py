"""A small in-process fake payments service that honours idempotency keys like Stripe's.

The lesson uses it to show why a retried side effect needs an idempotency key:

* same key + same parameters -> the charge made the first time is returned, nothing new;
* same key + different parameters -> :class:`IdempotencyError` (Stripe answers 400 too);
* no key -> every call is a new charge.

``fail_after_charge_once=True`` simulates the classic failure: the charge went through but the
response was lost (a ``ConnectionError`` after the charge is recorded), so a retry *without* a key
charges twice and a retry *with* the same key does not.

With ``path=...`` the state lives in a JSON file, re-read before and written (temp file +
``os.replace``, atomic) after every change, so several instances or processes — e.g. a kernel
killed with SIGKILL and its successor — see the same charges. There is no file lock: concurrent
writers from several processes can lose each other's updates, which a crash test with one
writer at a time never hits. Unlike Stripe, keys never expire (Stripe forgets them after 24 h).
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._errors import NbagentError

#: Version of the JSON file layout; a file with another version is refused.
FORMAT_VERSION = 1


class PaymentError(NbagentError):
    """A fake charge was refused (bad amount or currency, unreadable state file)."""


class IdempotencyError(PaymentError):
    """An idempotency key was reused with different parameters."""


@dataclass(frozen=True)
class Charge:
    """One charge, as the fake service recorded it."""

    #: ``"ch_000001"``, ``"ch_000002"``, ... in creation order.
    id: str
    #: Amount in the currency's smallest unit (cents).
    amount: int
    #: Lower-case ISO currency code (``"usd"``).
    currency: str
    #: Customer id the charge was made for.
    customer: str
    #: Wall-clock time of creation (seconds since the epoch).
    created: float
    #: The idempotency key sent with the request that created it, if any.
    idempotency_key: str | None = None


class FakePayments:
    """An in-memory (optionally file-backed) fake of Stripe's charge endpoint.

    :param path: JSON file holding the state (shared across instances and processes).
    :param fail_after_charge_once: raise ``ConnectionError`` once, *after* recording a charge.
    :param clock: wall clock for ``Charge.created`` (injectable for tests).
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        fail_after_charge_once: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = Path(path) if path is not None else None
        self.fail_after_charge_once = fail_after_charge_once
        self.clock = clock
        self._lock = threading.Lock()
        self._charges: list[Charge] = []
        #: idempotency key -> {"params": [...], "charge_id": "ch_..."}
        self._keys: dict[str, dict[str, Any]] = {}
        self._load()

    # -- persistence (private plumbing)
    def _load(self) -> None:
        if self.path is None or not self.path.exists():
            return
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise PaymentError(
                f"cannot read the fake payments file {str(self.path)!r}: {exc}. "
                "Delete it to start with no charges."
            ) from exc
        if data.get("format") != FORMAT_VERSION:
            raise PaymentError(
                f"{str(self.path)!r} has format {data.get('format')!r}, expected "
                f"{FORMAT_VERSION}: it was not written by this nbagent. Use another path."
            )
        self._charges = [Charge(**c) for c in data["charges"]]
        self._keys = dict(data["idempotency"])

    def _save(self) -> None:
        if self.path is None:
            return
        data = {
            "format": FORMAT_VERSION,
            "charges": [dataclasses.asdict(c) for c in self._charges],
            "idempotency": self._keys,
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(data, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    # -- public verbs
    def charge(
        self,
        amount_cents: int,
        currency: str,
        customer: str,
        *,
        idempotency_key: str | None = None,
    ) -> Charge:
        """Charge ``customer``; with an ``idempotency_key`` a repeated request is answered
        with the original charge instead of charging again.

        :raises IdempotencyError: the key was used before with other parameters.
        :raises PaymentError: amount not a positive integer, or currency not a 3-letter code.
        :raises ConnectionError: once, after the charge, if ``fail_after_charge_once``.
        """
        if isinstance(amount_cents, bool) or not isinstance(amount_cents, int) or amount_cents <= 0:
            raise PaymentError(f"amount_cents must be a positive integer, got {amount_cents!r}")
        if not (isinstance(currency, str) and len(currency) == 3 and currency.isalpha()):
            raise PaymentError(f"currency must be a 3-letter code like 'usd', got {currency!r}")
        currency = currency.lower()
        params = [amount_cents, currency, customer]
        with self._lock:
            self._load()
            if idempotency_key is not None and idempotency_key in self._keys:
                seen = self._keys[idempotency_key]
                if seen["params"] != params:
                    raise IdempotencyError(
                        f"idempotency key {idempotency_key!r} was first used to charge "
                        f"{_describe(seen['params'])}; this request charges {_describe(params)}. "
                        "A key may only be reused with the same parameters: use a new key for "
                        "a different charge."
                    )
                return self._by_id(seen["charge_id"])
            charge = Charge(
                id=f"ch_{len(self._charges) + 1:06d}",
                amount=amount_cents,
                currency=currency,
                customer=customer,
                created=self.clock(),
                idempotency_key=idempotency_key,
            )
            self._charges.append(charge)
            if idempotency_key is not None:
                self._keys[idempotency_key] = {"params": params, "charge_id": charge.id}
            self._save()
            if self.fail_after_charge_once:
                self.fail_after_charge_once = False
                raise ConnectionError(
                    f"connection lost after charge {charge.id} was made (fake fault): the "
                    "customer was charged but the response never arrived. Retry with the "
                    "same idempotency key to get the charge without charging twice."
                )
            return charge

    @property
    def charges(self) -> list[Charge]:
        """Every charge made, oldest first (a copy)."""
        with self._lock:
            self._load()
            return list(self._charges)

    def total_charged(self, customer: str | None = None, currency: str | None = None) -> int:
        """Sum of charged amounts (cents), optionally for one customer and/or currency."""
        return sum(
            c.amount
            for c in self.charges
            if (customer is None or c.customer == customer)
            and (currency is None or c.currency == currency.lower())
        )

    def _by_id(self, charge_id: str) -> Charge:
        for c in self._charges:
            if c.id == charge_id:
                return c
        raise PaymentError(f"charge {charge_id!r} is missing from the fake payments state")

    def __repr__(self) -> str:
        where = f"path={str(self.path)!r}" if self.path else "in memory"
        return f"FakePayments({where}, {len(self._charges)} charges)"


def _describe(params: list[Any]) -> str:
    amount, currency, customer = params
    return f"{amount} {currency} to customer {customer!r}"


__all__ = ["Charge", "FakePayments", "IdempotencyError", "PaymentError"]
