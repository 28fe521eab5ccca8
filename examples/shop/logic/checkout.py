"""Placing an order across the shop's services, as a saga (docs/sagas.md).

Three steps in two databases, with no distributed transaction: the stock is held in the shop's database, the
customer is charged in the payments service's, and the order is written in the shop's. Each step commits with
its own record, so a crash anywhere resumes where the saga was; when a step fails for good (not enough stock, a
declined charge), the steps already done are undone, newest first: the charge refunded, the stock put back.

Served as ``POST /sagas/place_order`` to the ``checkout`` app (gatehouse.toml).
"""

from decimal import Decimal
from typing import Any

from pydantic import BaseModel, Field

import gatehouse
from gatehouse import Saga
from gatehouse.logic.context import Context, LogicError

CENT = Decimal("0.01")
ATTEMPTS = 20
"""How often a balance or a stock level is read and set again when another order changed it in between."""


class Item(BaseModel):
    product_id: int
    quantity: int = Field(gt=0, le=100)


class NewOrder(BaseModel):
    customer_id: int
    items: list[Item] = Field(min_length=1, max_length=20)


class Line(BaseModel):
    product_id: int
    quantity: int
    unit_price: Decimal


class Hold(BaseModel):
    """The stock set aside for an order, at the prices it was set aside at."""

    lines: list[Line]

    @property
    def amount(self) -> Decimal:
        return sum((line.unit_price * line.quantity for line in self.lines), Decimal(0))


class Charge(BaseModel):
    id: int
    customer_id: int
    amount: Decimal


class Placed(BaseModel):
    order_id: int
    charge_id: int
    amount: Decimal


async def _add(ctx: Context, contract: str, column: str, delta: Decimal, *, what: str,
               **key: Any) -> dict[str, Any] | None:
    """Add ``delta`` to ``column`` of the one row of ``contract`` with ``key``; the row as it was before, or
    None when there is no such row. Refused (409) when it would go below zero.

    The dialect has no ``SET stock = stock - 2``, so this is a compare-and-set: the update names the value it
    read, and when another transaction changed the row in between it matches nothing and is tried again."""
    for _ in range(ATTEMPTS):
        row = await ctx.one(contract, **key)
        if row is None:
            return None
        now = Decimal(str(row[column]))
        if now + delta < 0:
            raise LogicError(f"{what}: {now} left, {-delta} wanted", status=409)
        if await ctx.update(contract, {column: str(now + delta)}, **key, **{column: row[column]}):
            return row
    raise LogicError(f"{what} changes too often right now: try again", status=503)


@gatehouse.step(database="shop")
async def reserve_stock(ctx: Context, items: list[Item]) -> Hold:
    lines = []
    for item in items:
        before = await _add(ctx, "stock", "stock", Decimal(-item.quantity),
                            what=f"the stock of product {item.product_id}", product_id=item.product_id)
        if before is None:
            raise LogicError(f"there is no product {item.product_id}", status=404)
        lines.append(Line(product_id=item.product_id, quantity=item.quantity,
                          unit_price=Decimal(str(before["price"])).quantize(CENT)))
    return Hold(lines=lines)


@gatehouse.step(database="shop")
async def release_stock(ctx: Context, hold: Hold) -> None:
    for line in hold.lines:
        await _add(ctx, "stock", "stock", Decimal(line.quantity), what=f"the stock of product {line.product_id}",
                   product_id=line.product_id)


@gatehouse.step(database="payments")
async def charge(ctx: Context, customer_id: int, amount: Decimal) -> Charge:
    try:
        account = await _add(ctx, "accounts", "balance", -amount, what=f"customer {customer_id}'s balance",
                             customer_id=customer_id)
    except LogicError as short:
        if short.status != 409:
            raise
        raise LogicError(f"payment declined: customer {customer_id}'s balance does not cover {amount}",
                         status=402) from None
    if account is None:
        raise LogicError(f"payment declined: customer {customer_id} has no account", status=402)
    [row] = await ctx.insert("charges", {"customer_id": customer_id, "amount": str(amount)})
    return Charge(id=row["id"], customer_id=customer_id, amount=amount)


@gatehouse.step(database="payments")
async def refund(ctx: Context, paid: Charge) -> None:
    await _add(ctx, "accounts", "balance", paid.amount, what=f"customer {paid.customer_id}'s balance",
               customer_id=paid.customer_id)
    await ctx.update("charges", {"status": "refunded"}, id=paid.id)


@gatehouse.step(database="shop")
async def create_order(ctx: Context, customer_id: int, hold: Hold) -> int:
    [order] = await ctx.insert("orders", {"user_id": customer_id, "status": "paid"})
    await ctx.insert("order_items", [{"order_id": order["id"], "product_id": line.product_id,
                                      "quantity": line.quantity, "unit_price": str(line.unit_price)}
                                     for line in hold.lines])
    return int(order["id"])


@gatehouse.saga(timeout_s=60)
async def place_order(s: Saga, order: NewOrder) -> Placed:
    hold = await s.step(reserve_stock, order.items).compensate_with(release_stock)
    paid = await s.step(charge, order.customer_id, hold.amount).compensate_with(refund)
    order_id = await s.step(create_order, order.customer_id, hold)
    return Placed(order_id=order_id, charge_id=paid.id, amount=paid.amount)
