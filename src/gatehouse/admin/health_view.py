"""The health page: ``gatehouse doctor``'s checks (:func:`gatehouse.observe.doctor_plan.diagnose`), run when
the page is opened, with each check's status, reason and what to do. The checks are async and each has its own
time limit, so a hung database costs this page a timeout, never the data port's loop."""

from __future__ import annotations

from gatehouse.admin.pages import render
from gatehouse.admin.sessions import Session
from gatehouse.http.exchange import HttpResponse
from gatehouse.observe.doctor import Options
from gatehouse.observe.doctor_plan import diagnose
from gatehouse.project import Project

CHECK_TIMEOUT_S = 5.0


async def health_page(project: Project, session: Session) -> HttpResponse:
    report = await diagnose(project, Options(timeout_s=CHECK_TIMEOUT_S))
    return render("health.html", session=session, report=report, summary=report.summary())
