// A JVM service in miniature for oomwake's tests: keeps LIVE_MIB MiB of live data,
// churns through short-lived and replaced objects (so the heap grows towards -Xmx and
// the collector runs often), and measures its own longest pause from the inside: a
// thread that wakes every 10 ms and records the largest gap between two wake-ups.
//
// Usage: java Pause LIVE_MIB SECONDS
// Prints "tick <seconds> <max gap ms so far>" every second and "done <max gap ms>" at
// the end.
public class Pause {
    static volatile long maxGapNanos = 0;

    public static void main(String[] args) throws Exception {
        int liveMiB = Integer.parseInt(args[0]);
        int seconds = Integer.parseInt(args[1]);
        Thread ticker = new Thread(() -> {
            long last = System.nanoTime();
            while (true) {
                try {
                    Thread.sleep(10);
                } catch (InterruptedException e) {
                    return;
                }
                long now = System.nanoTime();
                long gap = now - last;
                if (gap > maxGapNanos) {
                    maxGapNanos = gap;
                }
                last = now;
            }
        });
        ticker.setDaemon(true);
        ticker.start();

        final int chunk = 64 * 1024;
        byte[][] live = new byte[liveMiB * 16][];
        for (int i = 0; i < live.length; i++) {
            live[i] = new byte[chunk];
        }
        java.util.Random rnd = new java.util.Random(1);
        long start = System.nanoTime();
        long nextTick = start + 1_000_000_000L;
        int tick = 0;
        long sink = 0;
        while (System.nanoTime() - start < seconds * 1_000_000_000L) {
            // Replace a live chunk (old-generation garbage) and make some young garbage.
            byte[] b = new byte[chunk];
            b[rnd.nextInt(chunk)] = 1;
            live[rnd.nextInt(live.length)] = b;
            for (int j = 0; j < 4; j++) {
                byte[] g = new byte[chunk];
                g[j] = (byte) j;
                sink += g[rnd.nextInt(chunk)];
            }
            long now = System.nanoTime();
            if (now >= nextTick) {
                tick++;
                System.out.println("tick " + tick + " " + maxGapNanos / 1_000_000);
                nextTick += 1_000_000_000L;
            }
        }
        System.out.println("done " + maxGapNanos / 1_000_000 + " " + (sink & 1));
    }
}
