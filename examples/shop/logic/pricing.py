"""The shop's pricing rule, in one place instead of in every app: what an order costs after its discount."""

from decimal import Decimal

from pydantic import BaseModel

import gatehouse
from gatehouse.logic.context import Context, LogicError

PREMIUM_DISCOUNT = 15
LARGE_ORDER_DISCOUNT = 10
LARGE_ORDER_OVER = Decimal(100)


class OrderTotal(BaseModel):
    order_id: int
    tier: str
    subtotal: Decimal
    discount_percent: int
    total: Decimal


def discount_percent(tier: str, subtotal: Decimal) -> int:
    """Premium customers get 15 % off; other orders over 100 get 10 %; otherwise none."""
    if tier == "premium":
        return PREMIUM_DISCOUNT
    if subtotal > LARGE_ORDER_OVER:
        return LARGE_ORDER_DISCOUNT
    return 0


@gatehouse.rpc(read_only=True)
async def order_total(ctx: Context, order_id: int) -> OrderTotal:
    """The total of an order after the customer's discount."""
    order = await ctx.one("orders", "select=id,customer_summary(tier),order_items(quantity,unit_price)", id=order_id)
    if order is None:
        raise LogicError(f"There is no order {order_id}", status=404)
    subtotal = sum(
        (Decimal(str(item["quantity"])) * Decimal(str(item["unit_price"])) for item in order["order_items"]),
        Decimal(0),
    )
    tier = order["customer_summary"]["tier"]
    percent = discount_percent(tier, subtotal)
    total = (subtotal * (100 - percent) / 100).quantize(Decimal("0.01"))
    return OrderTotal(order_id=order_id, tier=tier, subtotal=subtotal, discount_percent=percent, total=total)
