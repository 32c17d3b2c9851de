"""Infrastructure: the only package that imports aio_pika or redis."""
