import pytest

from jobs import services
from jobs.models import Job, Status
from tests.conftest import wait_until
from tests.crawler_peer import CrawlerPeer


@pytest.mark.django_db(transaction=True)
def test_assign_done_and_requeue_on_close(processes, short_socket_path):
    peer = CrawlerPeer(short_socket_path)
    jobs = services.enqueue_many(urls=[f"https://example.com/{i}" for i in range(5)], actor="test")
    bus = processes.manage("runbus", "--endpoint", short_socket_path, env=processes.env(HEARTBEAT_TIMEOUT="5"))
    try:
        peer.handshake(slots=10)
        assigns = peer.recv_many("assign", 5)
        assert sorted(a["job_id"] for a in assigns) == sorted(j.id for j in jobs)
        peer.send({"type": "done", "job_id": assigns[0]["job_id"], "attempt": 1, "result": {"ok": 1}})
        ack = peer.recv("ack")
        assert ack["status"] == "recorded"
        assert Job.objects.get(id=assigns[0]["job_id"]).status == Status.SUCCEEDED
        peer.close()
        wait_until(lambda: Job.objects.filter(status=Status.QUEUED).count() == 4, timeout=5, message="requeue")
    finally:
        peer.shutdown()
        print(processes.output(bus))
