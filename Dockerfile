# Python 3.11 with the pinned requirements. Default command: the README's first run.
#   docker build -t edis-rl .
#   docker run --rm edis-rl                          # IQL on locally made Hopper data
#   docker run --rm edis-rl python -m pytest -q      # the tests
FROM python:3.11-slim
WORKDIR /edis-rl
COPY requirements.txt .
RUN pip install --no-cache-dir -r requirements.txt
COPY . .
CMD ["python", "algorithms/iql.py", "--config", "configs/local/hopper-random.yaml"]
