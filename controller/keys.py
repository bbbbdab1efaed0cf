"""Typed application state keys: every shared object of the app, in one place."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import web

from controller.clock import Clock
from controller.metrics import Metrics
from controller.settings import Settings

if TYPE_CHECKING:
    from connectors.base import Bot, Channel, ConnectorContext
    from controller.api.desk import DeskHub
    from controller.apps import AppRegistry
    from controller.bots import BotGateway
    from controller.campaigns import CampaignRunner
    from controller.cluster import Cluster
    from controller.customers import CustomerProfiles
    from controller.inbox import Inbox
    from controller.outbox import Dispatcher
    from controller.router import Router
    from controller.rules import RulebookHolder
    from controller.store.base import Store
    from controller.timers import Timers
    from controller.worker import Workers

SETTINGS: web.AppKey[Settings] = web.AppKey("settings")
CLOCK: web.AppKey[Clock] = web.AppKey("clock")
METRICS: web.AppKey[Metrics] = web.AppKey("metrics")
STORE: web.AppKey[Store] = web.AppKey("store")
RULES: web.AppKey[RulebookHolder] = web.AppKey("rules")
INBOX: web.AppKey[Inbox] = web.AppKey("inbox")
WORKERS: web.AppKey[Workers] = web.AppKey("workers")
DISPATCHER: web.AppKey[Dispatcher] = web.AppKey("dispatcher")
TIMERS: web.AppKey[Timers] = web.AppKey("timers")
ROUTER: web.AppKey[Router] = web.AppKey("router")
DESK: web.AppKey[DeskHub] = web.AppKey("desk")
HTTP: web.AppKey[aiohttp.ClientSession] = web.AppKey("http")
CHANNELS: web.AppKey[dict[str, Channel]] = web.AppKey("channels")
BOTS: web.AppKey[dict[str, Bot]] = web.AppKey("bots")
BOT_GATEWAY: web.AppKey[BotGateway] = web.AppKey("bot_gateway")
READY: web.AppKey[dict[str, Any]] = web.AppKey("ready")
CONNECTOR_CONTEXT: web.AppKey[ConnectorContext] = web.AppKey("connector_context")
CUSTOMERS: web.AppKey[CustomerProfiles] = web.AppKey("customers")
APPS: web.AppKey[AppRegistry] = web.AppKey("apps")
CAMPAIGNS: web.AppKey[CampaignRunner] = web.AppKey("campaigns")
# this process among others on PostgreSQL (None: one process, SQLite)
CLUSTER: web.AppKey[Cluster | None] = web.AppKey("cluster")
