"""fedq: asynchronous federated learning over RabbitMQ and Redis. The CLI composes it all."""
