"""Fixtures for the integration tests: a private RabbitMQ node for the fault tests."""

from tests.integration.private_rabbitmq import _private_rabbitmq_node, private_rabbitmq

__all__ = ["_private_rabbitmq_node", "private_rabbitmq"]
